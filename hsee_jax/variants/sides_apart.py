"""The two sides averaged apart ([choice], ``aggregate_sides=apart``, after
SplitFed's client-side and server-side averaging): a unit that some clients
hold in their client part and others in their server part keeps two
copies, each averaged over its side's holders only. A variant with one
hook, ``grouping`` ("side")."""
from __future__ import annotations

from hsee_jax import models
from hsee_jax.variants.base import Variant


def by_side(path, cut):
  return "side" if models.unit_index(path[1]) is not None else "unit"


VARIANT = Variant(name="sides-apart", grouping=by_side)


def from_config(cfg) -> Variant | None:
  return VARIANT if cfg.aggregate_sides == "apart" else None
