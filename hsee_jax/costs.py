"""Cost accounting per cut layer, computed from the model (not typed in).

For a cut ``l``: parameters of the client part (+ exit head) and of the server
part (+ classifier); FLOPs per training image on each side (XLA's cost
analysis of the compiled forward+backward at batch 1); bytes sent client ->
server per image (the activations ``h``) and server -> client (their gradient,
only with ``server_grad_to_client``); and the client's peak activation memory
per image (XLA's temporary buffer size of the compiled client step, batch 1).

``choose_cuts`` turns per-client budgets into cut layers: the deepest cut
whose client-side cost fits.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hsee_jax import models
from hsee_jax.config import NUM_UNITS


def _count(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _train_cost(net, span, image_or_h_shape, params, stats):
  first, last, head = span
  x = jnp.zeros((1,) + tuple(image_or_h_shape), jnp.float32)
  y = jnp.zeros((1,), jnp.int32)

  def loss(p, x):
    _, logits, _ = net.apply_span(p, stats, x, first, last, head, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  mem = compiled.memory_analysis()
  return float(analysis.get("flops", float("nan"))), int(getattr(mem, "temp_size_in_bytes", 0))


@functools.lru_cache(maxsize=None)
def cut_costs(net: models.SplitResNet18, cut: int, image_shape: tuple,
              server_grad_to_client: bool = False) -> dict:
  """Costs of splitting ``net`` at ``cut`` for one training image."""
  key = jax.random.PRNGKey(0)
  cp, cs = net.init_span(key, *models.client_span(cut), image_shape)
  sp, ss = net.init_span(key, *models.server_span(cut), image_shape)
  h_shape = net.unit_output_shape(cut, image_shape)
  client_flops, client_temp = _train_cost(net, models.client_span(cut), image_shape, cp, cs)
  server_flops, _ = _train_cost(net, models.server_span(cut), h_shape, sp, ss)
  h_bytes = 4 * math.prod(h_shape)
  return {
      "cut": cut,
      "client_params": _count(cp),
      "server_params": _count(sp),
      "client_train_flops": client_flops,
      "server_train_flops": server_flops,
      "activation_shape": list(h_shape),
      "bytes_client_to_server": h_bytes,
      "bytes_server_to_client": h_bytes if server_grad_to_client else 0,
      "client_peak_activation_bytes": client_temp,
  }


def cost_table(net: models.SplitResNet18, image_shape: tuple,
               server_grad_to_client: bool = False) -> list[dict]:
  return [cut_costs(net, c, tuple(image_shape), server_grad_to_client)
          for c in range(1, NUM_UNITS)]


def choose_cuts(net: models.SplitResNet18, image_shape: tuple, budgets: list[dict],
                batch_size: int = 1) -> list[dict]:
  """Deepest cut that fits each client's budget.

  A budget may give ``flops_per_step`` (client training FLOPs for one step of
  ``batch_size`` images), ``memory_bytes`` (parameters, gradients and momentum, 12 bytes a parameter, +
  peak activations of the client part) or both. Returns, per client, the cut
  and the reason; raises ``ValueError`` when not even cut 1 fits.
  """
  table = cost_table(net, tuple(image_shape))
  out = []
  for i, budget in enumerate(budgets):
    unknown = set(budget) - {"flops_per_step", "memory_bytes", "name"}
    if unknown:
      raise ValueError(f"client {i}: unknown budget key(s) {sorted(unknown)}; "
                       f"use flops_per_step and/or memory_bytes")
    chosen, why = None, ""
    for row in table:
      flops = row["client_train_flops"] * batch_size
      memory = 12 * row["client_params"] + row["client_peak_activation_bytes"] * batch_size
      fits = (flops <= budget.get("flops_per_step", math.inf)
              and memory <= budget.get("memory_bytes", math.inf))
      if fits:
        chosen = row["cut"]
        why = (f"cut {row['cut']}: {flops:.3g} FLOPs/step, {memory / 2**20:.1f} MiB "
               f"within the budget")
    if chosen is None:
      raise ValueError(f"client {i}: no cut fits its budget {budget} "
                       f"(cut 1 needs {table[0]['client_train_flops'] * batch_size:.3g} FLOPs/step)")
    if chosen < NUM_UNITS - 1:
      nxt = table[chosen]
      why += (f"; cut {chosen + 1} would need {nxt['client_train_flops'] * batch_size:.3g} "
              f"FLOPs/step, {(8 * nxt['client_params'] + nxt['client_peak_activation_bytes'] * batch_size) / 2**20:.1f} MiB")
    out.append({"client": i, "name": budget.get("name", f"client {i}"), "cut": chosen,
                "reason": why})
  return out
