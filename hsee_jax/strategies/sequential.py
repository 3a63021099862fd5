"""Hetero-SplitEE Sequential: one shared server part; the cohort's clients
take turns with it, and it continues from each client's cut (only units
cut+1..L and the classifier are updated for that client).

The state holds every client's own client part (``clients``, stacked per
cut) and the one shared server part (``server``, units min(cut)+1..L and
the classifier).
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from hsee_jax.fleet import Cohort
from hsee_jax.optim import PartState
from hsee_jax.strategies.aggregation import cross_layer_average
from hsee_jax.strategies.algorithm import (Algorithm, Context, EvalModel, cached_program,
                                           step_inputs)
from hsee_jax.strategies.parts import bad_rows, finite, group_key, opt_init, put, stack_copies, take


@flax.struct.dataclass
class SequentialState:
  clients: dict          # group_key(cut) -> client parts, leaves [N_cut, ...]
  server: PartState      # the shared server part: units min(cut)+1..L, classifier


def _programs(tx, keep_opt: bool):
  """The jitted helpers of a round: (take, put) one client's part."""
  def take_one(part, slot):
    one = take(part, slot)
    return one if keep_opt else one.replace(opt_state=opt_init(tx, one.params))

  def put_one(part, slot, one):
    return put(part, slot, one if keep_opt else one.replace(opt_state={}))

  return jax.jit(take_one), jax.jit(put_one, donate_argnums=0)


@jax.jit
def _average_clients(clients, weights):
  """``client_aggregation=cross_layer``: cross-layer average of the client parts."""
  return cross_layer_average(clients, weights)


def sequential(ctx: Context) -> Algorithm:
  """Hetero-SplitEE Sequential as an :class:`Algorithm`.

  Args:
    ctx: the run's :class:`Context` (as for :func:`averaging`).
  Returns:
    ``init(key)`` gives each client's client part and one server part for
    the whole network; ``apply(state, cohort)`` trains the cohort's clients
    one after another against that server part.
  """
  cfg, net, tx, fleet = ctx.cfg, ctx.net, ctx.tx, ctx.fleet
  keep_opt = cfg.client_state == "keep"
  min_cut = min(fleet.groups)

  def init(key) -> SequentialState:
    clients = {}
    for cut, ids in fleet.groups.items():
      p, s = net.init_span(key, *net.client_span(cut), ctx.image_shape)
      part = PartState(params=p, batch_stats=s, opt_state=opt_init(tx, p) if keep_opt else {})
      clients[group_key(cut)] = stack_copies(part, len(ids))
    p, s = net.init_span(key, *net.server_span(min_cut), ctx.image_shape)
    return SequentialState(clients=clients,
                           server=PartState(params=p, batch_stats=s, opt_state=opt_init(tx, p)))

  take_one, put_one = cached_program(("sequential", ctx.program_key),
                                     lambda: _programs(tx, keep_opt))
  weights = {group_key(c): jnp.asarray(fleet.data_sizes[ids]) for c, ids in fleet.groups.items()}

  def apply(state: SequentialState, cohort: Cohort):
    clients, server = dict(state.clients), state.server
    metrics = []
    for pos in range(cohort.size):
      cut = int(cohort.cuts[pos])
      g, slot = group_key(cut), int(cohort.slots[pos])
      client = take_one(clients[g], slot)
      sub = server.split(cut)[1]
      xs = step_inputs(cohort, pos)  # host arrays: sliced per step for free
      (client, sub), m = ctx.runners[cut].one(ctx.train_set, (client, sub, cohort.keys[pos]), xs)
      clients[g] = put_one(clients[g], slot, client)
      server = server.merge(sub)
      metrics.append(m)
    if cfg.aggregates_after(cohort.round):
      clients = _average_clients(clients, weights)
    return SequentialState(clients=clients, server=server), jnp.stack(metrics)

  def eval_models(state: SequentialState) -> list[EvalModel]:
    out = []
    for cut in fleet.groups:
      sub = state.server.split(cut)[1]
      for i in ctx.eval_sample(cut):
        out.append(EvalModel(cut, (int(i),), take(state.clients[group_key(cut)], int(fleet.slots[i])),
                             sub, False))
    return out

  def nonfinite_parts(state: SequentialState, ids=None) -> list[str]:
    bad = bad_rows(fleet, state.clients, "client part", ids)
    if not finite({"server": (state.server.params, state.server.batch_stats)})["server"]:
      bad.append("shared server part")
    return bad

  return Algorithm(init, apply, eval_models, nonfinite_parts,
                   ctx.per_client_bytes(init))
