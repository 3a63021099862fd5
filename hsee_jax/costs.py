"""Cost accounting per cut layer, computed from the model (not typed in).

For a cut ``l``: parameters of the client part (+ exit head) and of the server
part (+ classifier); FLOPs per training image on each side (XLA's cost
analysis of each unit's lowered forward+backward at batch 1, summed over the
part's units); bytes sent client -> server per image (the activations ``h``)
and server -> client (their gradient, only with ``server_grad_to_client``);
and the client's peak activation memory per image (the activations the
client's backward pass keeps: the vjp residuals less the weights).

``choose_cuts`` turns per-client budgets into cut layers: the deepest cut
whose client-side cost fits.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax import models
from hsee_jax import precision as precision_lib


def _count(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _module_cost(net, module, params, stats, in_shape, input_grad: bool) -> dict:
  """FLOPs of one training forward+backward of ``module`` on one image (XLA's
  cost analysis of the lowered gradient, in ``net``'s precision; a loss-free
  sum stands in for the rest of the network), and the bytes of activations it
  keeps for backward."""
  x = jnp.zeros((1,) + tuple(in_shape), jnp.float32)
  variables = lambda p: {"params": p, **({"batch_stats": stats} if stats else {})}

  def f(p, x):
    out = net.apply_module(module, variables(p), x, train=True,
                           mutable=["batch_stats"] if stats else False)
    y = out[0] if stats else out
    return jnp.sum(y * y, dtype=jnp.float32)
  argnums = (0, 1) if input_grad else 0
  residuals = jax.eval_shape(lambda p, x: jax.vjp(f, p, x)[1], params, x)
  return {"flops": _flops(jax.jit(jax.grad(f, argnums=argnums)), params, x),
          "forward_flops": _flops(jax.jit(f), params, x),
          "activation_bytes": max(0, precision_lib.tree_bytes(residuals)
                                  - precision_lib.tree_bytes(params)),
          "params": _count(params)}


def _flops(fn, *args) -> float:
  """XLA's FLOP count of the jitted ``fn`` on ``args``."""
  analysis = fn.lower(*args).cost_analysis()
  if not analysis:
    # jaxlib 0.11 on a GPU analyses only compiled programs, and XLA:GPU's
    # analysis leaves its cuDNN convolutions out: count the CPU program.
    cpu = jax.devices("cpu")[0]
    analysis = fn.lower(*jax.device_put(args, cpu)).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get("flops", float("nan")))


@functools.lru_cache(maxsize=None)
def _pieces(net: models.SplitNetwork, image_shape: tuple) -> dict:
  """Cost of every unit (with and without the gradient of its input) and head."""
  key = jax.random.PRNGKey(0)
  out = {}
  for k in range(1, net.num_units + 1):
    p, s = net.init_unit(key, k, image_shape)
    for input_grad in (False, True):
      out[(models.unit_name(k), input_grad)] = _module_cost(
          net, net.unit(k), p, s, net.input_shape(k, image_shape), input_grad)
  for cut in net.allowed_cuts():
    shape = net.unit_output_shape(cut, image_shape)
    p, s = net.init_head(key, models.EXIT_HEAD, shape)
    out[(models.EXIT_HEAD, cut)] = _module_cost(net, net.head(models.EXIT_HEAD), p, s, shape, True)
  shape = net.unit_output_shape(net.num_units, image_shape)
  p, s = net.init_head(key, models.CLASSIFIER, shape)
  out[models.CLASSIFIER] = _module_cost(net, net.head(models.CLASSIFIER), p, s, shape, True)
  return out


def _part(pieces: list[dict]) -> dict:
  return {k: sum(p[k] for p in pieces) for k in ("flops", "activation_bytes", "params")}


@functools.lru_cache(maxsize=None)
def cut_costs(net: models.SplitNetwork, cut: int, image_shape: tuple,
              server_grad_to_client: bool = False, exit_cuts: tuple = (),
              soft_labels: bool = False) -> dict:
  """Costs of splitting ``net`` at ``cut`` for one training image.

  The first unit of each part needs no input gradient (the image; the
  stop-gradient activations), except the server's with ``server_grad_to_client``.
  ``exit_cuts``: the cuts below ``cut`` where the client also trains an exit
  head (``client_exits=every``): their FLOPs and parameters are the
  client's; nothing more crosses the link. ``soft_labels``
  (``distill=server``): the server's logits go back to the client, float32.
  """
  pieces = _pieces(net, tuple(image_shape))
  unit = lambda k, first: pieces[(models.unit_name(k), not first)]
  client = _part([unit(k, k == 1) for k in range(1, cut + 1)] +
                 [pieces[(models.EXIT_HEAD, c)] for c in tuple(exit_cuts) + (cut,)])
  server = _part([unit(k, k == cut + 1 and not server_grad_to_client)
                  for k in range(cut + 1, net.num_units + 1)] + [pieces[models.CLASSIFIER]])
  h_shape = net.unit_output_shape(cut, image_shape)
  h_bytes = precision_lib.itemsize(net.precision) * math.prod(h_shape)  # in the compute dtype
  return {
      "cut": cut,
      "client_params": client["params"],
      "server_params": server["params"],
      "client_train_flops": client["flops"],
      "server_train_flops": server["flops"],
      "activation_shape": list(h_shape),
      "bytes_client_to_server": h_bytes,
      "bytes_server_to_client": ((h_bytes if server_grad_to_client else 0) +
                                 (4 * net.num_classes if soft_labels else 0)),
      "client_peak_activation_bytes": client["activation_bytes"],
  }


def cost_table(net: models.SplitNetwork, image_shape: tuple,
               server_grad_to_client: bool = False) -> list[dict]:
  return [cut_costs(net, c, tuple(image_shape), server_grad_to_client)
          for c in net.allowed_cuts()]


def run_cost_table(cfg, net: models.SplitNetwork, image_shape: tuple, fleet_cuts) -> dict:
  """Cut -> :func:`cut_costs` row of the fleet's cuts as ``cfg`` trains them:
  the server's gradient (``server_grad_to_client``), the lower exit heads
  (``client_exits=every``), the soft labels (``distill=server``)."""
  cuts = sorted(set(int(c) for c in fleet_cuts))
  return {c: cut_costs(net, c, tuple(image_shape), cfg.server_grad_to_client,
                       tuple(x for x in cuts if x < c) if cfg.client_exits == "every" else (),
                       cfg.distill == "server") for c in cuts}


def forward_flops(net: models.SplitNetwork, image_shape: tuple) -> float:
  """FLOPs of one forward pass of the whole network over one image in
  training mode: what recomputing the batch statistics costs per image
  (``static_bn``: ``strategies.static_bn.IMAGES`` of them per evaluated
  network)."""
  pieces = _pieces(net, tuple(image_shape))
  return sum(pieces[(models.unit_name(k), False)]["forward_flops"]
             for k in range(1, net.num_units + 1)) + pieces[models.CLASSIFIER]["forward_flops"]


def client_memory_bytes(row: dict, batch_size: int) -> float:
  """Parameters, gradients and momentum (12 bytes a parameter) plus peak activations."""
  return 12 * row["client_params"] + row["client_peak_activation_bytes"] * batch_size


def choose_cuts(net: models.SplitNetwork, image_shape: tuple, budgets, batch_size: int) -> list[dict]:
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
                       f"{mem_budget / 2**20:.1f} MiB); cut {table[0]['cut']} needs {f:.3g} FLOPs/step, "
                       f"{m / 2**20:.1f} MiB")
    row = fitting[-1]
    f, m = need(row)
    why = f"cut {row['cut']} needs {f:.3g} FLOPs/step and {m / 2**20:.1f} MiB"
    deeper = table[table.index(row) + 1:]
    if deeper:
      f2, m2 = need(deeper[0])
      over = [w for w, bad in ((f"{f2:.3g} FLOPs/step", f2 > flops_budget),
                               (f"{m2 / 2**20:.1f} MiB", m2 > mem_budget)) if bad]
      why += f"; cut {deeper[0]['cut']} would need {' and '.join(over)}, over the budget"
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
    client's server work: ``max(max_i(c_i + u_i), sum_i s_i)``.

  Plus, with ``aggregate`` (Averaging's cross-layer aggregation, Sequential's
  with ``client_aggregation``), every client sending and receiving its
  client part in float32 (``max_i 2 * 4 * params_i / bandwidth``).
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
    t = sum(max(ci + ui, si) for ci, ui, si in zip(c, u, s))
  else:
    t = max(max(ci + ui for ci, ui in zip(c, u)), sum(s))
  return float(t + (max(agg) if aggregate else 0.0))
