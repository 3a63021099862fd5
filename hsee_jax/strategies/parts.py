"""Parts of a network as the strategies store them: per-client parts stacked
per cut (leaves [N_cut, ...]), taken and put back by slot, and checked for
non-finite values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hsee_jax import models
from hsee_jax.optim import PartState


def group_key(cut: int) -> str:
  """The state's key of the clients at ``cut``."""
  return f"cut_{cut}"


def group_cut(key: str) -> int:
  """The cut of a state's group key (inverse of :func:`group_key`)."""
  return int(key.split("_")[1])


def stack_copies(tree, k: int):
  """``k`` copies of ``tree`` on a new leading axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), tree)


def take(tree, slots):
  """Rows ``slots`` of a stacked tree (out-of-range slots, padding, clipped)."""
  return jax.tree.map(lambda a: jnp.take(a, slots, axis=0, mode="clip"), tree)


def put(tree, slots, values):
  """``tree`` with rows ``slots`` set to ``values``; out-of-range slots (padding) are dropped."""
  return jax.tree.map(lambda a, v: a.at[slots].set(v, mode="drop"), tree, values)


def opt_init(tx, params: dict) -> dict:
  """Fresh optimiser state, one per subtree (unit, head) of ``params``."""
  return {n: tx.init(p) for n, p in params.items()}


def cut_variables(model: PartState, head: PartState, tier: PartState | None = None,
                  lower_heads: dict | None = None) -> PartState:
  """The whole network of a client (client part with its exit head, and
  server part) from one copy of every unit and its cut's exit head; the
  units of ``tier`` (its tier's own copies: a variant's grouping "tier")
  replace the shared ones; ``lower_heads`` (a variant's ``exits``: cut -> PartState)
  are the exit heads it also trains below its cut (``models.exit_head_at``)."""
  tier_params, tier_stats = (tier.params, tier.batch_stats) if tier is not None else ({}, {})
  heads = {models.EXIT_HEAD: head, **{models.exit_head_at(c): h
                                      for c, h in (lower_heads or {}).items()}}
  params = {**model.params, **tier_params, **{n: h.params for n, h in heads.items()}}
  stats = {**model.batch_stats, **tier_stats,
           **{n: h.batch_stats for n, h in heads.items() if h.batch_stats}}
  return PartState(params=params, batch_stats=stats, opt_state={})


# How a leaf is averaged (a variant's ``grouping(path, cut)``): across every
# model that holds its unit (the paper's cross-layer aggregation), within the
# holder's tier only, within the holder's side only (client parts apart from
# server parts), or not at all (kept per client).
GROUPS = ("unit", "tier", "side", "client")


def local_leaves(part: PartState, grouping, cut: int) -> PartState:
  """The leaves of ``part`` (parameters and batch statistics, with or
  without a leading client axis) that ``grouping`` keeps per client at
  ``cut``: it is called with each leaf's path, ``("params" | "batch_stats",
  unit or head, module, ..., leaf)``, and the cut, and answers one of :data:`GROUPS`."""
  def pick(kind, tree):
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if grouping((kind,) + k, cut) == "client"})
  return PartState(params=pick("params", part.params),
                   batch_stats=pick("batch_stats", part.batch_stats), opt_state={})


def leaf_paths(net: models.SplitNetwork, image_shape: tuple) -> list[tuple]:
  """Every leaf path of ``net`` as ``grouping`` sees it (every unit, the
  classifier and an exit head; shapes only, nothing computed)."""
  key = jax.random.PRNGKey(0)
  p, s = jax.eval_shape(lambda k: net.init_span(k, *net.full_span(), image_shape), key)
  hp, hs = jax.eval_shape(lambda k: net.init_exit_head(k, 1, image_shape), key)
  heads = ({models.EXIT_HEAD: hp}, {models.EXIT_HEAD: hs} if hs else {})
  return [(kind,) + path for kind, trees in (("params", (p, heads[0])), ("batch_stats", (s, heads[1])))
          for tree in trees for path in traverse_util.flatten_dict(tree)]


def names_in(paths, grouping, cut: int, group: str) -> set:
  """The subtree names (units, heads, the classifier) of ``paths`` whose
  leaves ``grouping`` puts in ``group`` at ``cut``."""
  return {p[1] for p in paths if grouping(p, cut) == group}


def with_local(part: PartState, local: PartState) -> PartState:
  """``part`` with the leaves ``local`` holds written over its own (the
  leaves a client keeps, :func:`local_leaves`); its other leaves as they are."""
  def over(tree, mine):
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    flat.update({k: v for k, v in traverse_util.flatten_dict(mine).items() if k in flat})
    return traverse_util.unflatten_dict(flat)
  return part.replace(params=over(part.params, local.params),
                      batch_stats=over(part.batch_stats, local.batch_stats))


@jax.jit
def finite(trees: dict) -> dict:
  """Name -> is every array of that subtree finite? (one compiled call per check)"""
  def ok(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.isfinite(a).all() for a in leaves])) if leaves else jnp.bool_(True)
  return {name: ok(tree) for name, tree in trees.items()}


@jax.jit
def _finite_rows(tree, slots) -> jax.Array:
  """[len(slots)]: is every array of row ``slots[i]`` finite?"""
  leaves = jax.tree.leaves(take(tree, slots))
  return jnp.all(jnp.stack([jnp.isfinite(a.reshape(a.shape[0], -1)).all(1) for a in leaves]), 0)


def bad_rows(fleet, stores: dict, side: str, ids=None) -> list[str]:
  """Clients whose per-client parameters (``stores[group_key(cut)]``) hold a
  NaN or Inf; only ``ids`` (the clients that just trained) when given, so
  the check costs O(cohort), not O(fleet)."""
  bad = []
  for cut, members in fleet.groups.items():
    part = stores[group_key(cut)]
    if not jax.tree.leaves((part.params, part.batch_stats)):
      continue
    who = members if ids is None else np.intersect1d(members, ids)
    if not len(who):
      continue
    ok = np.asarray(_finite_rows((part.params, part.batch_stats), fleet.slots[who]))
    bad += [f"client {who[j]} (cut {cut}) {side}" for j in np.flatnonzero(~ok)]
  return bad
