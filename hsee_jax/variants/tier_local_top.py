"""InclusiveFL's tier-local top unit ([choice], ``tier_local_top=True``;
Liu et al., KDD 2022): each tier's deepest client unit (unit l at cut l) is
averaged within its tier only; the shared copy of that unit is averaged
over its other holders. A variant with one hook, ``grouping`` ("tier")."""
from __future__ import annotations

from hsee_jax import models
from hsee_jax.variants.base import Variant


def top_unit_per_tier(path, cut):
  return "tier" if path[1] == models.unit_name(cut) else "unit"


VARIANT = Variant(name="tier-local-top", grouping=top_unit_per_tier)


def from_config(cfg) -> Variant | None:
  return VARIANT if cfg.tier_local_top else None
