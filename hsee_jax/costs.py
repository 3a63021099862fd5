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


def client_memory_bytes(row: dict, batch_size: int) -> float:
  """Parameters, gradients and momentum (12 bytes a parameter) plus peak activations."""
  return 12 * row["client_params"] + row["client_peak_activation_bytes"] * batch_size


def choose_cuts(net: models.SplitResNet18, image_shape: tuple, budgets, batch_size: int) -> list[dict]:
  """Deepest cut that fits each client's budget.

  ``budgets``: one ``(flops_per_step, memory_bytes)`` pair per client, 0 for
  no limit: client training FLOPs for one step of ``batch_size`` images, and
  client memory (:func:`client_memory_bytes`). Returns, per client, the cut
  and the reason; raises ``ValueError`` when not even cut 1 fits.
  """
  table = cost_table(net, tuple(image_shape))
  out = []
  for i, (flops_budget, mem_budget) in enumerate(budgets):
    flops_budget = flops_budget or math.inf
    mem_budget = mem_budget or math.inf
    need = lambda row: (row["client_train_flops"] * batch_size, client_memory_bytes(row, batch_size))
    fitting = [row for row in table if need(row)[0] <= flops_budget and need(row)[1] <= mem_budget]
    if not fitting:
      f, m = need(table[0])
      raise ValueError(f"client {i}: no cut fits its budget ({flops_budget:.3g} FLOPs/step, "
                       f"{mem_budget / 2**20:.1f} MiB); cut 1 needs {f:.3g} FLOPs/step, "
                       f"{m / 2**20:.1f} MiB")
    row = fitting[-1]
    f, m = need(row)
    why = f"cut {row['cut']} needs {f:.3g} FLOPs/step and {m / 2**20:.1f} MiB"
    if row["cut"] < NUM_UNITS - 1:
      f2, m2 = need(table[row["cut"]])
      over = [w for w, bad in ((f"{f2:.3g} FLOPs/step", f2 > flops_budget),
                               (f"{m2 / 2**20:.1f} MiB", m2 > mem_budget)) if bad]
      why += f"; cut {row['cut'] + 1} would need {' and '.join(over)}, over the budget"
    out.append({"client": i, "cut": row["cut"], "reason": why})
  return out


def simulated_round_seconds(strategy: str, cuts, table: dict, steps: int, batch_size: int,
                            client_flops_per_s, server_flops_per_s: float,
                            link_bytes_per_s: float, aggregate: bool = True) -> float:
  """Simulated wall time of one round (a simple pipeline model).

  Per client i and round: client compute ``c_i = S*B*client_flops / F_i``,
  upload ``u_i = S*B*activation_bytes / bandwidth`` (+ the gradient back when
  the table says so), server work ``s_i = S*B*server_flops / F_server``.

  * Sequential: clients wait their turn for the one server; within a turn the
    client and server pipeline, so a turn takes ``max(c_i + u_i, s_i)`` and the
    round is their sum.
  * Averaging: clients run in parallel and the one server machine does every
    client's server work: ``max(max_i(c_i + u_i), sum_i s_i)``, plus, when
    aggregating, every client sending and receiving its client part
    (``max_i 2 * 4 * params_i / bandwidth``).
  """
  n = steps * batch_size
  c, u, s, agg = [], [], [], []
  for i, cut in enumerate(cuts):
    row = table[cut]
    c.append(n * row["client_train_flops"] / client_flops_per_s[i])
    u.append(n * (row["bytes_client_to_server"] + row["bytes_server_to_client"]) / link_bytes_per_s)
    s.append(n * row["server_train_flops"] / server_flops_per_s)
    agg.append(2 * 4 * row["client_params"] / link_bytes_per_s)
  if strategy == "sequential":
    return float(sum(max(ci + ui, si) for ci, ui, si in zip(c, u, s)))
  t = max(max(ci + ui for ci, ui in zip(c, u)), sum(s))
  return float(t + (max(agg) if aggregate else 0.0))
