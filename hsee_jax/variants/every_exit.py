"""DepthFL's every exit ([choice], ``client_exits=every``; Kim et al., ICLR
2023): a client also trains an exit head at each of the fleet's cuts below
its own; its objective is the mean of the exits' losses (the paper's
objective over several exits: :func:`hsee_jax.strategies.exit_objective`),
and each exit head is averaged over every client that trains one. A variant
with one hook, ``exits``."""
from __future__ import annotations

from hsee_jax.variants.base import Variant


def lower_cuts(cut: int, cuts: tuple) -> tuple:
  """Every cut of the fleet below ``cut``."""
  return tuple(c for c in sorted(cuts) if c < cut)


VARIANT = Variant(name="every-exit", exits=lower_cuts)


def from_config(cfg) -> Variant | None:
  return VARIANT if cfg.client_exits == "every" else None
