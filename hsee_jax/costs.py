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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax import link as link_lib
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
              downlink_bytes: int = 0, link: link_lib.Link | None = None) -> dict:
  """Costs of splitting ``net`` at ``cut`` for one training image.

  The first unit of each part needs no input gradient (the image; the
  stop-gradient activations), except the server's with ``server_grad_to_client``.
  ``exit_cuts``: the cuts below ``cut`` where the client also trains an exit
  head (a variant's ``exits``): their FLOPs and parameters are the
  client's; nothing more crosses the link. ``downlink_bytes``: what else
  the server sends back per image (a variant's ``downlink``).
  ``link``: how the activations cross to the server (:class:`hsee_jax.link.Link`;
  None: as computed, in the compute dtype).
  """
  pieces = _pieces(net, tuple(image_shape))
  unit = lambda k, first: pieces[(models.unit_name(k), not first)]
  client = _part([unit(k, k == 1) for k in range(1, cut + 1)] +
                 [pieces[(models.EXIT_HEAD, c)] for c in tuple(exit_cuts) + (cut,)])
  server = _part([unit(k, k == cut + 1 and not server_grad_to_client)
                  for k in range(cut + 1, net.num_units + 1)] + [pieces[models.CLASSIFIER]])
  h_shape = net.unit_output_shape(cut, image_shape)
  itemsize = precision_lib.itemsize(net.precision)   # the compute dtype's
  h_bytes = itemsize * math.prod(h_shape)
  sent = (link or link_lib.Link()).message_bytes(h_shape, itemsize)
  return {
      "cut": cut,
      "client_params": client["params"],
      "server_params": server["params"],
      "client_train_flops": client["flops"],
      "server_train_flops": server["flops"],
      "activation_shape": list(h_shape),
      "bytes_client_to_server": sent,
      "bytes_server_to_client": (h_bytes if server_grad_to_client else 0) + downlink_bytes,
      "client_peak_activation_bytes": client["activation_bytes"],
  }


def cost_table(net: models.SplitNetwork, image_shape: tuple,
               server_grad_to_client: bool = False) -> list[dict]:
  return [cut_costs(net, c, tuple(image_shape), server_grad_to_client)
          for c in net.allowed_cuts()]


def run_cost_table(cfg, net: models.SplitNetwork, image_shape: tuple, fleet_cuts,
                   rnd: int | None = None, variant=None) -> dict:
  """Cut -> :func:`cut_costs` row of the fleet's cuts as ``cfg`` trains them
  in round ``rnd`` (None: the last): the server's gradient
  (``server_grad_to_client``), the link's compression (``link``), and the
  ``variant``'s (:mod:`hsee_jax.variants`; None: the paper's method): the
  lower exit heads its clients train (``exits``) and what the server sends
  back (``downlink``)."""
  cuts = tuple(sorted(set(int(c) for c in fleet_cuts)))
  rnd = cfg.rounds - 1 if rnd is None else rnd
  link = None if cfg.link == "none" else link_lib.Link(cfg.link, cfg.link_topk)
  exits = (variant.exits if variant is not None else None) or (lambda c, cs: ())
  down = (variant.downlink(cfg, net.num_classes, rnd)
          if variant is not None and variant.downlink is not None else 0)
  return {c: cut_costs(net, c, tuple(image_shape), cfg.server_grad_to_client, tuple(exits(c, cuts)),
                       int(down), link) for c in cuts}


def run_clock(cfg, net: models.SplitNetwork, image_shape: tuple, fleet,
              rnd: int | None = None, variant=None) -> Clock:
  """The :class:`Clock` of ``fleet`` (its cuts, FLOP/s and bandwidths) as
  ``cfg`` and ``variant`` train it in round ``rnd`` (None: the last;
  :func:`run_cost_table`)."""
  table = run_cost_table(cfg, net, image_shape, fleet.cuts, rnd, variant)
  link = fleet.link_bytes_per_s if fleet.link_bytes_per_s is not None else cfg.link_bytes_per_s
  return Clock.of(table, fleet.cuts, cfg.batch_size, fleet.flops_per_s, link,
                  cfg.server_flops_per_s, cfg.strategy)


def forward_flops(net: models.SplitNetwork, image_shape: tuple) -> float:
  """FLOPs of one forward pass of the whole network over one image in
  training mode: what recomputing the batch statistics costs per image
  (HeteroFL's static batch norm, a variant, recomputes them over 10,000 images per
  evaluated network)."""
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


def simulated_round_seconds(strategy: str, cuts, table: dict, steps, batch_size: int,
                            client_flops_per_s, server_flops_per_s: float,
                            link_bytes_per_s, aggregate: bool = True) -> float:
  """Simulated wall time of one round in which every client of ``cuts``
  takes part (:meth:`Clock.round_seconds`; the rule in docs/usage.md,
  "The simulated clock"). ``steps`` (S_i), ``client_flops_per_s`` and
  ``link_bytes_per_s`` are one figure for all or one per client."""
  clock = Clock.of(table, cuts, batch_size, client_flops_per_s, link_bytes_per_s,
                   server_flops_per_s, strategy)
  return clock.round_seconds(np.arange(len(cuts)), steps, aggregate)


@dataclasses.dataclass(frozen=True)
class Clock:
  """The simulated clock: each client's seconds and bytes, per client id.

  The rule (docs/usage.md, "The simulated clock"), for client i with S_i
  local steps of B images:

  * a local step on the client takes ``step_s[i] = B * client_flops / F_i +
    step_bytes[i] / bandwidth_i`` (its compute, then its messages on its
    link: the activations as the link sends them, + the gradient or soft
    labels back when the cost table says so);
  * the aggregation's transfer (a round that aggregates) takes
    ``aggregate_s[i] = 2 * 4 * client_params / bandwidth_i`` (its client part
    up and the average down, float32);
  * client i is done at ``t_i = S_i * step_s[i] + aggregate_s[i]`` (its
    own compute and transfers, summed);
  * the server's work for client i is ``S_i * server_step_s[i]``.

  **Averaging** (clients in parallel, one server machine doing every
  client's server work): the round ends when the last client is done or
  the server has done all its work, ``max(max_i t_i, sum_i S_i *
  server_step_s[i])``. **Sequential** (clients take turns on the one
  server, client and server pipelined within a turn): ``sum_i max(S_i *
  step_s[i], S_i * server_step_s[i])``, then the aggregation's transfer
  (with ``client_aggregation``) ``max_i aggregate_s[i]``, all clients at once.
  A round nobody takes part in takes 0 s, except under a deadline
  (:func:`hsee_jax.fleet.participants`), where the server waits until the
  deadline for what it asked for.
  """
  step_s: np.ndarray         # [N] a local step: client compute + link
  aggregate_s: np.ndarray    # [N] client part up and down in float32
  server_step_s: np.ndarray  # [N] the server's work per step of that client
  step_bytes: np.ndarray     # [N] bytes on the link per local step (both ways)
  aggregate_bytes: np.ndarray  # [N]
  sequential: bool

  @classmethod
  def of(cls, table: dict, cuts, batch_size: int, client_flops_per_s, link_bytes_per_s,
         server_flops_per_s: float, strategy: str) -> "Clock":
    """The clock of clients at ``cuts`` with ``table`` (cut -> :func:`cut_costs` row)."""
    cuts = np.asarray(cuts)
    distinct, which = np.unique(cuts, return_inverse=True)
    col = lambda key: np.asarray([table[int(c)][key] for c in distinct], np.float64)[which]
    flops = np.broadcast_to(np.asarray(client_flops_per_s, np.float64), cuts.shape)
    link = np.broadcast_to(np.asarray(link_bytes_per_s, np.float64), cuts.shape)
    step_bytes = batch_size * (col("bytes_client_to_server") + col("bytes_server_to_client"))
    return cls(step_s=batch_size * col("client_train_flops") / flops + step_bytes / link,
               aggregate_s=2 * 4 * col("client_params") / link,
               server_step_s=batch_size * col("server_train_flops") / server_flops_per_s,
               step_bytes=step_bytes, aggregate_bytes=2 * 4 * col("client_params"),
               sequential=strategy == "sequential")

  def client_seconds(self, ids, steps, aggregate: bool) -> np.ndarray:
    """``t_i``: when each client of ``ids`` is done with ``steps`` local
    steps (one figure or one per client) and, with ``aggregate``, its transfer."""
    return np.asarray(steps) * self.step_s[ids] + (self.aggregate_s[ids] if aggregate else 0.0)

  def steps_within(self, ids, seconds: float, most: int, aggregate: bool) -> np.ndarray:
    """The local steps (0..``most``) each client of ``ids`` finishes within
    ``seconds``, with its aggregation transfer when ``aggregate``."""
    left = seconds - (self.aggregate_s[ids] if aggregate else 0.0)
    return np.clip(np.floor(left / self.step_s[ids] + 1e-9), 0, most).astype(np.int64)

  def round_seconds(self, ids, steps, aggregate: bool) -> float:
    """The round of clients ``ids`` with ``steps`` local steps each (0.0 with nobody)."""
    ids = np.asarray(ids, np.int64)
    if not len(ids):
      return 0.0
    steps = np.broadcast_to(np.asarray(steps, np.float64), ids.shape)
    work, server = steps * self.step_s[ids], steps * self.server_step_s[ids]
    if self.sequential:
      return float(np.sum(np.maximum(work, server))) + (
          float(np.max(self.aggregate_s[ids])) if aggregate else 0.0)
    done = work + (self.aggregate_s[ids] if aggregate else 0.0)
    return float(max(np.max(done), np.sum(server)))

  def round_bytes(self, ids, steps, aggregate: bool) -> int:
    """Bytes on the link in the round of clients ``ids`` (every direction):
    their steps' messages and, with ``aggregate``, their client parts."""
    ids = np.asarray(ids, np.int64)
    steps = np.broadcast_to(np.asarray(steps, np.float64), ids.shape)
    total = np.sum(steps * self.step_bytes[ids]) + (np.sum(self.aggregate_bytes[ids]) if aggregate else 0)
    return int(round(float(total)))
