"""Cross-layer aggregation (PAPER.md, "Averaging"): every unit averaged over
all the models that hold a copy of it, weighted by the clients' data sizes.

Two forms that give the same floats: :func:`cross_layer_average`, the
reference over stacked parts, and the streaming form training uses,
:func:`chunk_sums` per chunk of clients then :func:`combine_sums` once per
round, so memory holds one weighted sum per cut, never the cohort.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hsee_jax import models
from hsee_jax.optim import PartState
from hsee_jax.strategies.parts import group_cut, group_key, stack_copies


def _weighted_sum(tree, w):
  return jax.tree.map(lambda a: jnp.tensordot(w.astype(a.dtype), a, axes=1), tree)


def cross_layer_average(parts: dict[str, PartState], weights: dict[str, Any]) -> dict[str, PartState]:
  """Average every unit over all the models that hold a copy of it (reference form).

  ``parts`` maps a name to a stacked PartState (client parts and/or server
  parts of one or more groups); ``weights[name]`` is the [K] data size of its
  clients. For each unit and the final classifier, the parameters and batch
  statistics of every copy are averaged, weighted by data size, and written
  back to every copy. Exit heads are averaged only within a part's own stack
  (clients that share a cut); optimiser states stay local. Training uses the
  streaming form (:func:`chunk_sums`, :func:`combine_sums`), which computes
  the same average from one weighted sum per cut.
  """
  names = sorted({n for part in parts.values() for n in part.params})
  new = {k: (dict(p.params), dict(p.batch_stats)) for k, p in parts.items()}
  for name in names:
    holders = [k for k, p in parts.items() if name in p.params]
    groups = [[k] for k in holders] if name == models.EXIT_HEAD else [holders]
    for group in groups:
      total = sum(jnp.sum(weights[k]) for k in group)
      summed = None
      for k in group:
        leaf = (parts[k].params[name], parts[k].batch_stats.get(name, {}))
        s = _weighted_sum(leaf, weights[k])
        summed = s if summed is None else jax.tree.map(jnp.add, summed, s)
      avg = jax.tree.map(lambda a: a / total, summed)
      for k in group:
        kk = jax.tree.leaves(parts[k].params[name])[0].shape[0]
        p_avg, s_avg = stack_copies(avg, kk)
        new[k][0][name] = p_avg
        if name in parts[k].batch_stats:
          new[k][1][name] = s_avg
  return {k: PartState(params=new[k][0], batch_stats=new[k][1], opt_state=parts[k].opt_state)
          for k in parts}


def chunk_sums(part: PartState, weights, acc: dict | None) -> dict:
  """Add a chunk's data-size-weighted sums of every subtree to ``acc``.

  ``part``: parameters and batch statistics with a leading client axis [K];
  ``weights`` [K] (0 for padding, which so drops out). ``acc`` (None for the
  first chunk of a cut) holds ``params``, ``batch_stats`` and ``total``.
  """
  sums = {"params": _weighted_sum(part.params, weights),
          "batch_stats": _weighted_sum(part.batch_stats, weights),
          "total": jnp.sum(weights)}
  return sums if acc is None else jax.tree.map(jnp.add, acc, sums)


def combine_sums(model: PartState, exit_heads: dict, sums: dict,
                 tier_units: dict | None = None) -> tuple[PartState, dict, dict]:
  """The cross-layer average from one weighted sum per cut (``sums[cut]``).

  Unit k is averaged over every client: from its client part where k <= cut,
  else its server part; the classifier over all; the exit head at cut c over
  the clients at c and every client that trains one at c below its own cut
  (a variant's ``exits``, DepthFL: ``models.exit_head_at(c)``).
  The sums are added in the order :func:`cross_layer_average` adds its parts
  (client parts by cut, then server parts by cut), so both give the same
  floats. A name no client held (zero total, or absent from every cut's
  sums) keeps its old value.

  ``tier_units`` (a variant's grouping "tier", InclusiveFL's top unit):
  group key -> PartState of the units a tier keeps to itself. Such a unit of the tier at cut c is
  averaged over that tier's clients alone, and the shared copy over the
  other holders only. Returns ``(model, exit_heads, tier_units)``.
  """
  cuts = sorted(sums)
  tier_units = dict(tier_units or {})
  local = {c: set(tier_units[group_key(c)].params) for c in cuts if group_key(c) in tier_units}

  def average(holders):
    """The weighted average over ``holders``, (cut, subtree name) pairs."""
    summed, total = None, 0
    for c, name in holders:
      leaf = (sums[c]["params"][name], sums[c]["batch_stats"].get(name, {}))
      summed = leaf if summed is None else jax.tree.map(jnp.add, summed, leaf)
      total = total + sums[c]["total"]
    return jax.tree.map(lambda a: a / total, summed), total

  def pick(avg, total, old):
    return jax.tree.map(lambda a, o: jnp.where(total > 0, a, o), avg, old)

  params, stats = dict(model.params), dict(model.batch_stats)
  for name in model.params:
    k = models.unit_index(name)  # None: the classifier, held by every server part
    holders = ([c for c in cuts if c >= k] + [c for c in cuts if c < k] if k is not None
               else list(cuts))
    holders = [c for c in holders if name not in local.get(c, ()) and name in sums[c]["params"]]
    if not holders:
      continue
    (p, s), total = average([(c, name) for c in holders])
    params[name] = pick(p, total, model.params[name])
    if name in stats:
      stats[name] = pick(s, total, model.batch_stats[name])
  heads = dict(exit_heads)
  for g, old in exit_heads.items():
    c, lower = group_cut(g), models.exit_head_at(group_cut(g))
    holders = ([(c, models.EXIT_HEAD)] if c in sums else []) + [
        (l, lower) for l in cuts if lower in sums[l]["params"]]
    if not holders:
      continue
    (p, s), total = average(holders)
    heads[g] = PartState(params=pick(p, total, old.params),
                         batch_stats=pick(s, total, old.batch_stats) if old.batch_stats else {},
                         opt_state={})
  for c in cuts:
    g = group_key(c)
    if c in local:
      old = tier_units[g]
      t_params, t_stats = dict(old.params), dict(old.batch_stats)
      for name in local[c]:
        (p, s), total = average([(c, name)])
        t_params[name] = pick(p, total, old.params[name])
        if name in t_stats:
          t_stats[name] = pick(s, total, old.batch_stats[name])
      tier_units[g] = PartState(params=t_params, batch_stats=t_stats, opt_state={})
  return PartState(params=params, batch_stats=stats, opt_state={}), heads, tier_units


def _names(sums: dict, keep) -> dict:
  """``sums`` of one cut restricted to the subtree names ``keep`` accepts."""
  return {"params": {n: v for n, v in sums["params"].items() if keep(n)},
          "batch_stats": {n: v for n, v in sums["batch_stats"].items() if keep(n)},
          "total": sums["total"]}


def combine_sides(model: PartState, server_units: PartState, exit_heads: dict, sums: dict,
                  tier_units: dict | None = None) -> tuple[PartState, dict, dict, PartState]:
  """The cross-layer average with the two sides apart (a variant's grouping
  "side", after SplitFed's client-side and server-side averaging): a unit that some
  clients hold in their client part and others in their server part keeps
  two copies, ``model``'s averaged over the client parts that hold it and
  ``server_units``' over the server parts. Two :func:`combine_sums`, each
  over its side's sums. Returns ``(model, exit_heads, tier_units, server_units)``.
  """
  both = set(server_units.params)
  server_at = {c: {n for n in both if models.unit_index(n) > c} for c in sums}
  model, heads, tiers = combine_sums(
      model, exit_heads, {c: _names(s, lambda n, c=c: n not in server_at[c]) for c, s in sums.items()},
      tier_units)
  server_units, _, _ = combine_sums(
      server_units, {}, {c: _names(s, lambda n, c=c: n in server_at[c]) for c, s in sums.items()})
  return model, heads, tiers, server_units
