"""Exits weighted by depth ([choice], ``exit_weights=rising``, with
``client_exits=every``): the k-th of a client's n exits (shallowest first)
weighs k / (1 + ... + n) in its objective instead of DepthFL's 1 / n, the
deepest most. A variant with one hook, ``objective``."""
from __future__ import annotations

from hsee_jax.strategies.update import cross_entropy
from hsee_jax.variants.base import Variant


def objective(exits, final, labels, hp):
  losses = [cross_entropy(e, labels) for e in exits]
  w, n = hp["exit_loss_weight"], len(exits)
  if n == 1:
    return w * losses[0]
  return w * sum((k + 1) * v for k, v in enumerate(losses)) / (n * (n + 1) / 2)


VARIANT = Variant(name="rising", objective=objective)


def from_config(cfg) -> Variant | None:
  return VARIANT if cfg.exit_weights == "rising" else None
