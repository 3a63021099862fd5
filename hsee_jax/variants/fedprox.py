"""FedProx's proximal term ([choice], ``prox_mu``; Li et al., MLSys 2020):
each local step adds ``prox_mu / 2 * ||w - w0||^2`` over the client part
(its exit heads included) and its server part, ``w0`` the weights the client
began its round with. A variant with one hook, ``step_penalty``."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hsee_jax.variants.base import Variant


def squared_distance(a, b) -> jax.Array:
  """``||a - b||^2`` over two trees of the same structure, in float32."""
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def make(mu: float) -> Variant:
  def step_penalty(params, start, hp):
    return 0.5 * mu * (squared_distance(params[0], start[0]) + squared_distance(params[1], start[1]))
  return Variant(name="fedprox", step_penalty=step_penalty)


def from_config(cfg) -> Variant | None:
  return make(cfg.prox_mu) if cfg.prox_mu else None
