"""Hetero-SplitEE Averaging: a server part per client, all clients in
parallel, cross-layer aggregation every ``aggregate_every`` rounds.

Between rounds the state holds one copy of every unit and of the classifier
(``model``), one exit head per cut (``exit_heads``), and per client only what
persists (``clients[cut]``, leaves [N_cut, ...]): the optimiser state with
``client_state=keep``, the whole model when aggregation is not every round,
else the leaves a variant keeps per client (its ``grouping`` hook answers
"client", FedBN's batch norm: :func:`parts.local_leaves`), which no
aggregation averages. A variant's grouping adds a tier's own copies of the
units it answers "tier" for (``tier_units``) and the server side's copies
of the units it answers "side" for that both sides hold (``server_units``);
both are empty otherwise. The per-client
copies of client and server parts exist only for the clients of the current chunk (``engine.blocks``): each chunk's data-size-weighted
sums go into one accumulator per cut (:func:`aggregation.chunk_sums`), so
memory holds a chunk of models and one sum per cut, never the cohort.
"""
from __future__ import annotations

import functools

import flax
import jax
import numpy as np

from hsee_jax import engine, models
from hsee_jax.fleet import Cohort
from hsee_jax.optim import PartState
from hsee_jax.strategies import aggregation
from hsee_jax.strategies.algorithm import (Algorithm, Context, EvalModel, cached_program,
                                           step_inputs)
from hsee_jax.strategies.parts import (bad_rows, cut_variables, finite, group_cut, group_key,
                                       leaf_paths, local_leaves, names_in, opt_init, put,
                                       stack_copies, take, with_local)
from hsee_jax.strategies.update import METRIC_NAMES


@flax.struct.dataclass
class AveragingState:
  model: PartState       # one copy of every unit and the classifier (no optimiser state)
  exit_heads: dict       # group_key(cut) -> PartState of that cut's exit head
  clients: dict          # group_key(cut) -> per-client PartState, leaves [N_cut, ...]
  tier_units: dict = flax.struct.field(default_factory=dict)  # group_key(cut) -> PartState
                         # of the units that tier keeps its own copies of (grouping "tier")
  server_units: PartState = flax.struct.field(default_factory=lambda: PartState({}, {}, {}))
                         # the server side's copies of the units held in client parts and in
                         # server parts (grouping "side"; else empty)


def model_at(model: PartState, server_units: PartState, cut: int) -> PartState:
  """The shared model as a client at ``cut`` takes it: the server side's
  copy of each unit above the cut where there is one (grouping "side")."""
  above = [n for n in server_units.params if models.unit_index(n) > cut]
  return model.merge(server_units.subset(above)) if above else model


def client_server_parts(state: AveragingState, cut: int, tx) -> tuple[PartState, PartState]:
  """A client's client part and server part at ``cut`` taken from an Averaging
  state's shared model, with fresh optimiser state (benchmarks, profiles)."""
  g = group_key(cut)
  full = cut_variables(model_at(state.model, state.server_units, cut), state.exit_heads[g],
                       state.tier_units.get(g))
  full = full.replace(opt_state=opt_init(tx, full.params))
  return full.split(cut)


def _chunk_fns(tx, cut: int, keep_opt: bool, keep_models: bool, due: bool, grouping=None):
  """(prepare, finish) of a chunk of clients at ``cut``, for
  :meth:`engine.ClientRunner.chunk_program` (``grouping``: which leaves a
  client keeps, :func:`parts.local_leaves`; None: none). ``read``: (model, exit head,
  tier unit, lower exit heads, slots, weights, keys, metric rows); ``owned``
  (donated): (the cut's per-client store, its accumulator, the round's
  metrics [C, 4])."""

  def prepare(read, owned):
    """Client and server parts of the chunk's clients (leading axis [K]) and their keys."""
    model, head, tier, lower, slots, _, keys, _ = read
    kept = owned[0]
    full = cut_variables(model, head, tier, lower)
    if keep_models:
      full = PartState(params=take(kept.params, slots), batch_stats=take(kept.batch_stats, slots),
                       opt_state={})
    else:
      full = stack_copies(full, len(slots))
      if grouping is not None:
        full = with_local(full, PartState(take(kept.params, slots),
                                          take(kept.batch_stats, slots), {}))
    opt = (take(kept.opt_state, slots) if keep_opt
           else stack_copies(opt_init(tx, take(full.params, 0)), len(slots)))
    return (*full.replace(opt_state=opt).split(cut), keys)

  def finish(outputs, read, owned):
    """The chunk's clients back into the per-client store, their weighted
    sums into the cut's accumulator when the round aggregates, their metrics
    into the round's rows (a padded client's row, C, is dropped)."""
    (client, server), m = outputs
    _, _, _, _, slots, weights, _, rows = read
    kept, acc, metrics = owned
    full = client.merge(server)
    mine = (full if keep_models else local_leaves(full, grouping, cut) if grouping is not None
            else PartState({}, {}, {}))
    kept = PartState(params=put(kept.params, slots, mine.params),
                     batch_stats=put(kept.batch_stats, slots, mine.batch_stats),
                     opt_state=put(kept.opt_state, slots, full.opt_state) if keep_opt else {})
    return (kept, aggregation.chunk_sums(full, weights, acc) if due else acc,
            metrics.at[rows].set(m, mode="drop"))

  return prepare, finish


_combine = jax.jit(aggregation.combine_sums)
_combine_sides = jax.jit(aggregation.combine_sides)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _spread(kept, model, heads, tier_units, server_units, exit_cuts, grouping):
  """After an aggregation with per-client models: every client takes the
  average (``exit_cuts``: (group key, its lower exit cuts) pairs), but for
  the leaves it keeps (``grouping``, :func:`parts.local_leaves`)."""
  out, lower = {}, dict(exit_cuts)
  for g, part in kept.items():
    n = jax.tree.leaves(part.params)[0].shape[0]
    avg = stack_copies(cut_variables(model_at(model, server_units, group_cut(g)), heads[g],
                                     tier_units.get(g),
                                     {c: heads[group_key(c)] for c in lower[g]}), n)
    if grouping is not None:
      avg = with_local(avg, local_leaves(part, grouping, group_cut(g)))
    out[g] = PartState(params=avg.params, batch_stats=avg.batch_stats, opt_state=part.opt_state)
  return out


def averaging(ctx: Context) -> Algorithm:
  """Hetero-SplitEE Averaging as an :class:`Algorithm`.

  Args:
    ctx: the run's :class:`Context` (config, network, optimiser, fleet,
      train set, client runners); :func:`hsee_jax.build` makes one from a config.
  Returns:
    ``init(key)`` gives the state (one client part and one server part per
    client, stored per cut), ``apply(state, cohort)`` trains one round of
    the cohort's clients.
  """
  cfg, net, tx, fleet = ctx.cfg, ctx.net, ctx.tx, ctx.fleet
  keep_opt = cfg.client_state == "keep"
  keep_models = cfg.aggregate_every > 1  # clients' models differ between aggregations
  cuts = sorted(fleet.groups)
  # a variant's grouping, read once per leaf name and cut: the units each tier keeps its own
  # copy of, those averaged per side, and whether clients keep leaves of their own (FedBN)
  paths = leaf_paths(net, ctx.image_shape) if ctx.grouping is not None else []
  tier_names = {c: names_in(paths, ctx.grouping, c, "tier") for c in cuts}
  side_names = set().union(*(names_in(paths, ctx.grouping, c, "side") for c in cuts))
  both = [models.unit_name(k) for k in range(cuts[0] + 1, cuts[-1] + 1)
          if models.unit_name(k) in side_names]   # units held on both sides, a copy each
  grouping = (ctx.grouping if any(names_in(paths, ctx.grouping, c, "client") for c in cuts)
              else None)                          # leaves kept per client, or None
  per_tier = any(tier_names.values()) or bool(both)  # the tiers' networks are not one network
  exit_cuts = tuple((group_key(c), ctx.exit_cuts(c)) for c in cuts)

  def lower_heads(heads: dict, cut: int) -> dict:
    """The exit heads a client at ``cut`` also trains (a variant's ``exits``)."""
    return {c: heads[group_key(c)] for c in ctx.exit_cuts(cut)}

  def init(key) -> AveragingState:
    """Every unit starts from the same weights wherever it is held (unit k's
    init depends on (key, k) only; an exit head's on (key, cut))."""
    p, s = net.init_span(key, *net.full_span(), ctx.image_shape)
    model = PartState(params=p, batch_stats=s, opt_state={})
    server = PartState(params={n: p[n] for n in both},  # the server side's copies, same init
                       batch_stats={n: s[n] for n in both if n in s}, opt_state={})
    heads, clients, tiers = {}, {}, {}
    for cut, ids in fleet.groups.items():
      hp, hs = net.init_exit_head(key, cut, ctx.image_shape)
      heads[group_key(cut)] = PartState(params=hp, batch_stats=hs, opt_state={})
      if tier_names[cut]:  # the tier's own copies, from the same init
        tiers[group_key(cut)] = PartState(
            params={n: p[n] for n in sorted(tier_names[cut])},
            batch_stats={n: s[n] for n in sorted(tier_names[cut]) if n in s}, opt_state={})
      full = cut_variables(model_at(model, server, cut), heads[group_key(cut)], None,
                           lower_heads(heads, cut))
      mine = (full if keep_models else local_leaves(full, grouping, cut) if grouping is not None
              else PartState({}, {}, {}))
      kept = PartState(params=mine.params, batch_stats=mine.batch_stats,
                       opt_state=opt_init(tx, full.params) if keep_opt else {})
      clients[group_key(cut)] = stack_copies(kept, len(ids))
    return AveragingState(model=model, exit_heads=heads, clients=clients, tier_units=tiers,
                          server_units=server)

  def chunk_program(cut: int, due: bool):
    """The compiled program of a chunk at ``cut`` (engine.ClientRunner.chunk_program)."""
    mesh = ctx.mesh
    return cached_program(
        ("averaging", ctx.runner_key(cut), due, grouping,
         mesh and tuple(d.id for d in mesh.mesh.devices.flat)),
        lambda: ctx.runners[cut].chunk_program(*_chunk_fns(tx, cut, keep_opt, keep_models, due,
                                                           grouping),
                                               constrain=mesh and mesh.constrain))

  def apply(state: AveragingState, cohort: Cohort):
    """One round: the cohort's clients of each cut, chunk by chunk; then the
    cross-layer aggregation when the round is due."""
    due = cfg.aggregates_after(cohort.round)
    kept, sums = dict(state.clients), {}
    metrics = np.zeros((cohort.size, len(METRIC_NAMES)), np.float32)
    for cut in sorted(int(c) for c in np.unique(cohort.cuts)):
      g, n_cut = group_key(cut), len(fleet.groups[cut])
      pad = cfg.samples_clients and ctx.runners[cut].stacked
      program = chunk_program(cut, due)
      for pos, real in engine.blocks(np.flatnonzero(cohort.cuts == cut), ctx.chunk, pad):
        k = len(pos)
        slots = np.concatenate([cohort.slots[pos[:real]], np.full(k - real, n_cut)])
        weights = np.concatenate([cohort.weights[pos[:real]], np.zeros(k - real, np.float32)])
        rows = np.concatenate([pos[:real], np.full(k - real, cohort.size)])
        xs, keys = step_inputs(cohort, pos), cohort.keys[pos]
        if ctx.mesh is not None:
          xs, keys = ctx.mesh.place((xs, keys), k)
        read = (model_at(state.model, state.server_units, cut), state.exit_heads[g],
                state.tier_units.get(g),
                lower_heads(state.exit_heads, cut), slots, weights, keys, rows)
        kept[g], sums[cut], metrics = program(ctx.train_set, read, (kept[g], sums.get(cut), metrics), xs)
    model, heads, tiers, server = (state.model, state.exit_heads, state.tier_units,
                                   state.server_units)
    if due and both:
      model, heads, tiers, server = _combine_sides(model, server, heads, sums, tiers)
    elif due:
      model, heads, tiers = _combine(model, heads, sums, tiers)
    if due and keep_models:
      kept = _spread(kept, model, heads, tiers, server, exit_cuts, grouping)
    return AveragingState(model=model, exit_heads=heads, clients=kept, tier_units=tiers,
                          server_units=server), metrics

  def eval_models(state: AveragingState) -> list[EvalModel]:
    """Each tier's network at its cut (its own exit head only), as the
    variant's ``evaluated`` hook transforms it (HeteroFL's static batch norm)."""
    def evaluated(network: PartState) -> PartState:
      return ctx.evaluated(net, network, ctx.train_set, cfg.seed) if ctx.evaluated else network
    out = []
    model = state.model if per_tier else evaluated(state.model)
    for cut, ids in fleet.groups.items():
      g = group_key(cut)
      if keep_models or grouping is not None:  # clients differ: a seeded sample of them
        shared = None if keep_models else cut_variables(
            model_at(state.model, state.server_units, cut), state.exit_heads[g],
            state.tier_units.get(g))
        for i in ctx.eval_sample(cut):
          mine = take(state.clients[g], int(fleet.slots[i]))
          full = (mine if keep_models else with_local(shared, mine)).subset(
              net.client_names(cut) + net.server_names(cut))
          out.append(EvalModel(cut, (int(i),), *evaluated(full).split(cut), False))
        continue
      full = cut_variables(model_at(model, state.server_units, cut), state.exit_heads[g],
                           state.tier_units.get(g))
      if per_tier:
        full = evaluated(full)
      # one network split at the cuts, unless a tier keeps its own top unit or
      # the server side its own copies
      out.append(EvalModel(cut, tuple(int(i) for i in ids), *full.split(cut), not per_tier))
    return out

  def nonfinite_parts(state: AveragingState, ids=None) -> list[str]:
    flags = jax.device_get(finite({
        **{f"model {n}": (p, state.model.batch_stats.get(n, {})) for n, p in state.model.params.items()},
        **{f"exit head of cut {g.split('_')[1]}": (h.params, h.batch_stats)
           for g, h in state.exit_heads.items()},
        **{f"tier {g.split('_')[1]}'s own {n}": (p, t.batch_stats.get(n, {}))
           for g, t in state.tier_units.items() for n, p in t.params.items()},
        **{f"server side's {n}": (p, state.server_units.batch_stats.get(n, {}))
           for n, p in state.server_units.params.items()}}))
    bad = [name for name, ok in flags.items() if not ok]
    if keep_models or grouping is not None:
      bad += bad_rows(fleet, state.clients, "model", ids)
    return bad

  return Algorithm(init, apply, eval_models, nonfinite_parts,
                   ctx.per_client_bytes(init))
