"""Hetero-SplitEE training: the client update, Sequential and Averaging.

The split update (PAPER.md, "Training"): per minibatch,

* client: ``loss_c = CE(exit_head(client_part(x)), y)`` updates client part + exit head;
* server: ``loss_s = CE(server_part(stop_gradient(h)), y)``, ``h = client_part(x)``,
  updates server part + classifier.

Both come from one ``value_and_grad`` of ``w * loss_c + loss_s`` (w =
exit_loss_weight) over (client, server) parameters: ``loss_c`` does not touch
the server, and the ``stop_gradient`` keeps ``loss_s`` out of the client
unless ``server_grad_to_client`` (classical split learning) is set.

The two strategies are values built by two functions, as FedJAX builds a
federated algorithm: :func:`averaging` and :func:`sequential` each return an
:class:`Algorithm` whose ``apply(state, cohort) -> (state, metrics [C, 4])``
trains one round's cohort (:class:`hsee_jax.fleet.Cohort`) and reads nothing
back to the host. Each has its own state type:

* :class:`AveragingState`: between rounds one copy of every unit and of the
  classifier (``model``), one exit head per cut (``exit_heads``), and per
  client only what persists (``clients[cut]``, leaves [N_cut, ...]): the
  optimiser state with ``client_state=keep``, the whole model when
  aggregation is not every round. The per-client copies of client and server
  parts exist only for the clients of the current chunk.
* :class:`SequentialState`: every client's own client part (``clients``,
  stacked per cut) and the one shared server part (``server``, units
  min(cut)+1..L and the classifier).

Clients of a cut run in chunks of at most ``client_chunk`` (one compiled call
per chunk, ``engine.ClientRunner``); the cross-layer aggregation adds each
chunk's data-size-weighted sums into one accumulator per cut, so memory holds
a chunk of models and one sum per cut, never the cohort.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import types
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hsee_jax import config as config_lib
from hsee_jax import data as data_lib
from hsee_jax import models
from hsee_jax import optim
from hsee_jax.config import Config, ConfigError
from hsee_jax.engine import ClientRunner, ClientUpdate, resolve_chunk, resolve_mode
from hsee_jax.fleet import Cohort, Fleet, chunk_plan
from hsee_jax.optim import PartState, apply_gradients

METRIC_NAMES = ("exit_loss", "full_loss", "exit_acc", "full_acc")

# -- programs shared across simulations in one process ----------------------------
# The config fields a round's compiled programs read (besides the network's
# class count and the cut), declared in ``config.PROGRAM_FIELDS``. Simulations
# in one process whose configs agree on them (tests, sweeps, a run built
# twice) share their compiled programs; everything else (seed, learning rate
# and schedule, rounds, the fleet, the data; momentum, weight decay and
# exit-loss weight as ``Cohort.hparams``) reaches the programs as inputs.
# Programs are built from :func:`program_config`, which holds these fields
# only, so a program that reads a field not listed here fails at once instead
# of being shared wrongly.
PROGRAM_FIELDS = config_lib.PROGRAM_FIELDS
PROGRAM_CACHE_SIZE = 64
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def clear_shared_programs() -> None:
  """Forget every shared program (the next simulation compiles afresh)."""
  _PROGRAMS.clear()


def program_config(cfg: Config) -> types.SimpleNamespace:
  """The fields of ``cfg`` that compiled programs may read (:data:`PROGRAM_FIELDS`)."""
  return types.SimpleNamespace(**{f: getattr(cfg, f) for f in PROGRAM_FIELDS})


def shared_program(key: tuple, make: Callable):
  """``make()``, built once per ``key`` in this process and then reused (its
  jitted functions keep their compilations); the least recently used of more
  than :data:`PROGRAM_CACHE_SIZE` are dropped."""
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]
  value = _PROGRAMS[key] = make()
  while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
    _PROGRAMS.popitem(last=False)
  return value


def group_key(cut: int) -> str:
  return f"cut_{cut}"


@dataclasses.dataclass(frozen=True)
class Shared:
  """What every client update reads: the train set on device and its
  normalisation statistics. Runs trained together (:func:`apply_runs`) share
  one: their train sets one after another (a run's images start at its
  ``Context.offset``) and one row of ``mean``/``std`` [R, C] per distinct
  train set (a run's is ``Context.row``)."""
  images: Any
  labels: Any
  mean: Any
  std: Any


jax.tree_util.register_dataclass(Shared, data_fields=["images", "labels", "mean", "std"],
                                 meta_fields=[])


def make_shared(datasets) -> tuple[Shared, list[int], list[int]]:
  """Put train sets on the device for the split update.

  Args:
    datasets: :class:`hsee_jax.Dataset` values (a train set met twice is
      stored once).
  Returns:
    ``(shared, offsets, rows)``: one :class:`Shared` holding every distinct
    train set one after another, then for each dataset where its images start
    and its row of ``shared.mean`` / ``shared.std``.
  """
  distinct, offsets, rows = [], [], []
  for ds in datasets:
    j = next((j for j, d in enumerate(distinct) if d is ds or (
        d.train_labels.shape == ds.train_labels.shape
        and np.array_equal(d.train_labels, ds.train_labels)
        and np.array_equal(d.train_images, ds.train_images))), None)
    if j is None:
      j = len(distinct)
      distinct.append(ds)
    rows.append(j)
  starts = np.cumsum([0] + [len(d.train_labels) for d in distinct]).tolist()
  offsets = [starts[j] for j in rows]
  shared = Shared(jnp.asarray(np.concatenate([d.train_images for d in distinct])),
                  jnp.asarray(np.concatenate([d.train_labels for d in distinct])),
                  jnp.asarray(np.stack([d.mean for d in distinct])),
                  jnp.asarray(np.stack([d.std for d in distinct])))
  return shared, offsets, rows


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels: the default split-update loss."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def preprocessing(augment: bool = True, augment_pad: float = 0.125) -> Callable:
  """The default input preprocessing, ``(key, uint8 images [B, H, W, 3], mean, std)
  -> float images``: a random crop of the padded image and a horizontal flip
  (if ``augment``; ``augment_pad`` is the padding as a share of the side),
  then per-channel normalisation."""
  def preprocess(key, images, mean, std):
    if augment:
      images = data_lib.augment(key, images, augment_pad)
    return data_lib.normalize(images, mean, std)
  return preprocess


def split_update(net: models.SplitNetwork, cut: int, *, loss: Callable = cross_entropy,
                 preprocess: Callable | None = None, optimizer: str = "sgd",
                 nesterov: bool = False, server_grad_to_client: bool = False) -> ClientUpdate:
  """The Hetero-SplitEE client update for a client at ``cut``, as FedJAX's
  init / step / final (:class:`hsee_jax.engine.ClientUpdate`).

  Each step: the client part and its exit head give ``exit_loss`` (on the
  exit logits), the server part given the client part's activations gives
  ``full_loss``; one ``value_and_grad`` of ``w * exit_loss +
  full_loss`` (w = the exit-loss weight) updates both parts; no gradient
  reaches the client part from the server unless ``server_grad_to_client``.

  Args:
    net: the split network; ``cut`` one of its ``allowed_cuts()``.
    loss: ``(logits, labels) -> scalar``, for both the exit and the final
      logits (default: :func:`cross_entropy`).
    preprocess: ``(key, images, mean, std) -> images`` (default:
      :func:`preprocessing` with augmentation).
    optimizer, nesterov: ``sgd`` | ``adam`` and SGD's Nesterov flag
      (:func:`hsee_jax.optim.direction`).

  The state is ``(client PartState, server PartState, PRNG key)``; the
  per-step input ``(indices [B], hparams [4], row)``: indices into
  ``shared.images`` / ``shared.labels`` (:class:`Shared`), ``hparams`` =
  learning rate, momentum, weight decay, exit-loss weight
  (``fleet.HPARAMS``), ``row`` the row of ``shared.mean`` / ``shared.std``.
  The output is ``((client, server), metrics [4])``, the metrics
  (``METRIC_NAMES``) averaged over the steps.
  """
  preprocess = preprocessing() if preprocess is None else preprocess

  def init(shared, state):
    client, server, key = state
    return client, server, key, jnp.zeros(len(METRIC_NAMES)), jnp.zeros(())

  def step(shared, carry, x):
    client, server, key, msum, n = carry
    idx, hp, row = x
    lr, momentum, weight_decay, exit_weight = hp[0], hp[1], hp[2], hp[3]
    step_tx = optim.direction(optimizer, nesterov, momentum, weight_decay)
    key, aug_key = jax.random.split(key)
    labels = shared.labels[idx]
    images = preprocess(aug_key, shared.images[idx], shared.mean[row], shared.std[row])

    def loss_fn(client_params, server_params):
      (exit_logits,), logits, (c_stats,), s_stats = net.split_forward(
          [(client_params, client.batch_stats)], (server_params, server.batch_stats), images,
          [cut], train=True, server_grad_to_client=server_grad_to_client)
      loss_c, loss_s = loss(exit_logits, labels), loss(logits, labels)
      metrics = jnp.stack([loss_c, loss_s, _accuracy(exit_logits, labels),
                           _accuracy(logits, labels)])
      return exit_weight * loss_c + loss_s, (metrics, c_stats, s_stats)

    (_, (metrics, c_stats, s_stats)), (g_client, g_server) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(client.params, server.params)
    client = apply_gradients(step_tx, client, g_client, lr, c_stats)
    server = apply_gradients(step_tx, server, g_server, lr, s_stats)
    return client, server, key, msum + metrics, n + 1

  def final(shared, carry):
    client, server, _, msum, n = carry
    return (client, server), msum / n

  return ClientUpdate(init, step, final)


# -- state ----------------------------------------------------------------------
@flax.struct.dataclass
class AveragingState:
  model: PartState       # one copy of every unit and the classifier (no optimiser state)
  exit_heads: dict       # group_key(cut) -> PartState of that cut's exit head
  clients: dict          # group_key(cut) -> per-client PartState, leaves [N_cut, ...]


@flax.struct.dataclass
class SequentialState:
  clients: dict          # group_key(cut) -> client parts, leaves [N_cut, ...]
  server: PartState      # the shared server part: units min(cut)+1..L, classifier


def _stack_copies(tree, k: int):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), tree)


def _take(tree, slots):
  return jax.tree.map(lambda a: jnp.take(a, slots, axis=0, mode="clip"), tree)


def _put(tree, slots, values):
  """``tree`` with rows ``slots`` set to ``values``; out-of-range slots (padding) are dropped."""
  return jax.tree.map(lambda a, v: a.at[slots].set(v, mode="drop"), tree, values)


def _opt_init(tx, params: dict) -> dict:
  return {n: tx.init(p) for n, p in params.items()}


def _cut_variables(model: PartState, head: PartState) -> PartState:
  """The whole network of a client (client part with its exit head, and
  server part) from the shared model and its cut's exit head."""
  params = {**model.params, models.EXIT_HEAD: head.params}
  stats = {**model.batch_stats, **({models.EXIT_HEAD: head.batch_stats} if head.batch_stats else {})}
  return PartState(params=params, batch_stats=stats, opt_state={})


def client_server_parts(state: "AveragingState", cut: int, tx) -> tuple[PartState, PartState]:
  """A client's client part and server part at ``cut`` taken from an Averaging
  state's shared model, with fresh optimiser state (benchmarks, profiles)."""
  full = _cut_variables(state.model, state.exit_heads[group_key(cut)])
  full = full.replace(opt_state=_opt_init(tx, full.params))
  return full.split(cut)


def _nbytes(tree) -> int:
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def _weighted_sum(tree, w):
  return jax.tree.map(lambda a: jnp.tensordot(w.astype(a.dtype), a, axes=1), tree)


# -- cross-layer aggregation ------------------------------------------------------------
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
        p_avg, s_avg = _stack_copies(avg, kk)
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


def combine_sums(model: PartState, exit_heads: dict, sums: dict) -> tuple[PartState, dict]:
  """The cross-layer average from one weighted sum per cut (``sums[cut]``).

  Unit k is averaged over every client: from its client part where k <= cut,
  else its server part; the classifier over all; an exit head over its cut.
  The sums are added in the order :func:`cross_layer_average` adds its parts
  (client parts by cut, then server parts by cut), so both give the same
  floats. A name no client held (zero total) keeps its old value.
  """
  cuts = sorted(sums)

  def average(name, holders):
    summed, total = None, 0
    for c in holders:
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
    (p, s), total = average(name, holders)
    params[name] = pick(p, total, model.params[name])
    if name in stats:
      stats[name] = pick(s, total, model.batch_stats[name])
  heads = dict(exit_heads)
  for c in cuts:
    g = group_key(c)
    (p, s), total = average(models.EXIT_HEAD, [c])
    old = exit_heads[g]
    heads[g] = PartState(params=pick(p, total, old.params),
                         batch_stats=pick(s, total, old.batch_stats) if old.batch_stats else {},
                         opt_state={})
  return PartState(params=params, batch_stats=stats, opt_state={}), heads


# -- the algorithm value -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A client part and the server part its activations go to, standing for
  ``clients`` (every client of the cut when they share one model). The
  ``shared`` models of a state are one whole network split at their cuts
  (Averaging after an aggregation), so their full path is evaluated once."""
  cut: int
  clients: tuple
  client: PartState
  server: PartState
  shared: bool


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A strategy as a value (after FedJAX's ``FederatedAlgorithm``).

  * ``init(key) -> state``;
  * ``apply(state, cohort) -> (state, metrics [C, 4] on device)``; consumes
    ``state`` (its per-client buffers are donated);
  * ``eval_models(state) -> [EvalModel]``: what evaluation runs;
  * ``nonfinite_parts(state, ids=None) -> [str]``: parts holding a NaN or
    Inf (per-client parts: of clients ``ids`` only, when given);
  * ``per_client_bytes``: bytes of persistent state per client, by cut;
  * ``stack_key``: algorithms (of different runs) with the same key train a
    round together in the same compiled calls (:func:`apply_runs`), by
    ``apply_stacked(states, cohorts, contexts) -> (states, metrics)``, lists
    of one entry per run; None: one after another.
  """
  name: str
  init: Callable
  apply: Callable
  eval_models: Callable
  nonfinite_parts: Callable
  per_client_bytes: dict
  stack_key: tuple | None = None
  apply_stacked: Callable | None = None
  ctx: Any = None


def apply_runs(algorithms: list[Algorithm], states: list, cohorts: list) -> tuple[list, list]:
  """One round of several runs: ``(states, metrics)``, one of each per run.

  Runs whose algorithms share a ``stack_key`` (Averaging runs of one sweep
  batch: same programs, same fleet shape, one :class:`Shared`) are stacked:
  each compiled call trains a chunk of every run's clients, and the
  cross-layer aggregation stays within each run. The others train one after
  another."""
  states, metrics = list(states), [None] * len(states)
  groups: dict = {}
  for i, a in enumerate(algorithms):
    groups.setdefault(a.stack_key if a.stack_key is not None else ("alone", i), []).append(i)
  for members in groups.values():
    a = algorithms[members[0]]
    if len(members) > 1:
      new, ms = a.apply_stacked([states[i] for i in members], [cohorts[i] for i in members],
                                [algorithms[i].ctx for i in members])
    else:
      state, m = a.apply(states[members[0]], cohorts[members[0]])
      new, ms = [state], [m]
    for i, st, m in zip(members, new, ms):
      states[i], metrics[i] = st, m
  return states, metrics


@dataclasses.dataclass
class Context:
  """What both strategies are built from: config, network, optimiser, fleet,
  the train set on device, and one client runner per cut."""
  cfg: Config
  net: models.SplitNetwork
  tx: optax.GradientTransformation
  fleet: Fleet
  shared: Shared
  image_shape: tuple
  mode: str = ""
  chunk: int = 1
  runners: dict = dataclasses.field(default_factory=dict)
  mesh: Any = None
  sharded_chunks: int = 0   # chunks laid over the mesh (a count for tests)
  offset: int = 0           # where this run's train images start in ``shared``
  row: int = 0              # this run's row of ``shared.mean`` / ``shared.std``
  program_key: tuple = ()   # what the compiled programs depend on (shared_program)

  def __post_init__(self):
    cfg = self.cfg
    # Sequential runs one client at a time (the server is shared): never stacked
    mode = "loop" if cfg.strategy == "sequential" and cfg.mode == "auto" else cfg.mode
    if mode == "auto" and cfg.shard_clients and resolve_mode(mode) == "loop":
      mode = "vmap"  # the client axis over the mesh needs a stacked mode
    self.mode = resolve_mode(mode)
    self.chunk = resolve_chunk(cfg.client_chunk)
    self.program_key = (self.net.num_classes,) + tuple(getattr(cfg, f) for f in PROGRAM_FIELDS)
    view = program_config(cfg)
    self.runners = {
        cut: shared_program(("runner", self.program_key, cut, self.mode),
                            lambda cut=cut: ClientRunner(split_update(
                                self.net, cut, preprocess=preprocessing(view.augment, view.augment_pad),
                                optimizer=view.optimizer, nesterov=view.nesterov,
                                server_grad_to_client=view.server_grad_to_client), self.mode))
        for cut in self.fleet.groups}
    if cfg.shard_clients:
      if cfg.strategy != "averaging" or self.mode not in ("vmap", "unrolled"):
        raise ConfigError("shard_clients: needs strategy=averaging and mode=vmap or unrolled")
      self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("clients",))

  def place(self, tree, k: int):
    """A chunk of ``k`` clients laid over the mesh's client axis when ``k``
    divides evenly (else replicated); unchanged without ``shard_clients``."""
    if self.mesh is None:
      return tree
    spec = P("clients") if k % self.mesh.devices.size == 0 else P()
    self.sharded_chunks += spec == P("clients")
    return jax.device_put(tree, NamedSharding(self.mesh, spec))

  def eval_sample(self, cut: int) -> np.ndarray:
    """The clients of ``cut`` evaluated where clients differ: ``eval_clients``
    of them, seeded and fixed for the run (0 = all)."""
    ids = self.fleet.groups[cut]
    n = self.cfg.eval_clients
    if not n or n >= len(ids):
      return ids
    return np.sort(np.random.default_rng([self.cfg.seed, 17, cut]).choice(ids, n, replace=False))


def step_inputs(ctx: Context, cohort: Cohort, positions) -> tuple:
  """The per-step inputs of :func:`split_update` (indices, hparams, row) for
  the clients at ``positions`` of ``cohort`` (leading client axis), or for
  one client (an int position), as host arrays."""
  steps = cohort.hparams.shape[0]
  if isinstance(positions, (int, np.integer)):
    return (cohort.indices[positions] + ctx.offset, cohort.hparams,
            np.full(steps, ctx.row, np.int32))
  k = len(positions)
  return (cohort.indices[positions] + ctx.offset,
          np.broadcast_to(cohort.hparams, (k,) + cohort.hparams.shape),
          np.full((k, steps), ctx.row, np.int32))


@jax.jit
def _finite(trees: dict) -> dict:
  """Name -> is every array of that subtree finite? (one compiled call per check)"""
  def ok(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.isfinite(a).all() for a in leaves])) if leaves else jnp.bool_(True)
  return {name: ok(tree) for name, tree in trees.items()}


def _per_client_bytes(ctx: "Context", init) -> dict:
  """Bytes of persistent per-client state of one client, by cut (from the
  state's shapes; worked out once per program and fleet shape)."""
  fleet = ctx.fleet
  def make():
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    return {cut: _nbytes(shapes.clients[group_key(cut)]) // len(ids)
            for cut, ids in fleet.groups.items()}
  return shared_program(("per_client_bytes", ctx.cfg.strategy, ctx.program_key, ctx.image_shape,
                         tuple((c, len(ids)) for c, ids in fleet.groups.items())), make)


@jax.jit
def _finite_rows(tree) -> jax.Array:
  """[N]: is every array of row i finite?"""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.isfinite(a.reshape(a.shape[0], -1)).all(1) for a in leaves]), 0)


@jax.jit
def _finite_rows_of(tree, slots) -> jax.Array:
  return _finite_rows(_take(tree, slots))


def _bad_rows(ctx: Context, stores: dict, side: str, ids=None) -> list[str]:
  """Clients whose per-client parameters hold a NaN or Inf; only ``ids`` (the
  clients that just trained) when given, so the check costs O(C), not O(N)."""
  bad = []
  for cut, members in ctx.fleet.groups.items():
    part = stores[group_key(cut)]
    if not jax.tree.leaves((part.params, part.batch_stats)):
      continue
    who = members if ids is None else np.intersect1d(members, ids)
    if not len(who):
      continue
    ok = np.asarray(_finite_rows_of((part.params, part.batch_stats), ctx.fleet.slots[who]))
    bad += [f"client {who[j]} (cut {cut}) {side}" for j in np.flatnonzero(~ok)]
  return bad


@functools.partial(jax.jit, donate_argnums=0)
def _scatter_rows(buf, ms, pos):
  """``buf`` [C, 4] with a chunk's metrics [K, 4] written at its cohort
  positions (padding, at position C, dropped); one compilation per K."""
  return buf.at[pos].set(ms, mode="drop")


# -- Averaging -----------------------------------------------------------------------------
def _averaging_programs(tx, keep_opt: bool, keep_models: bool):
  """The jitted helpers of an Averaging round: (prepare, finish).

  A call serves R runs (R = 1 for a run alone): ``models``, ``heads``,
  ``kept`` and ``accs`` are lists of one entry per run, ``slots`` and
  ``weights`` [R, K]; the chunk is R blocks of K clients, run after run."""

  def _prepare(cut, models_, heads, kept, slots):
    """Client and server parts of a chunk (leading axis [R * K])."""
    k = slots.shape[1]
    blocks = []
    for r in range(len(models_)):
      full = _cut_variables(models_[r], heads[r])
      if keep_models:
        full = PartState(params=_take(kept[r].params, slots[r]),
                         batch_stats=_take(kept[r].batch_stats, slots[r]), opt_state={})
      else:
        full = _stack_copies(full, k)
      opt = (_take(kept[r].opt_state, slots[r]) if keep_opt
             else _stack_copies(_opt_init(tx, _take(full.params, 0)), k))
      blocks.append(full.replace(opt_state=opt))
    full = blocks[0] if len(blocks) == 1 else jax.tree.map(lambda *b: jnp.concatenate(b), *blocks)
    return full.split(cut)

  def _finish(kept, accs, client, server, weights, slots, due):
    full, k = client.merge(server), slots.shape[1]
    kept, accs = list(kept), list(accs)
    for r in range(len(kept)):
      block = full if len(kept) == 1 else jax.tree.map(lambda a: a[r * k:(r + 1) * k], full)
      kept[r] = PartState(
          params=_put(kept[r].params, slots[r], block.params) if keep_models else {},
          batch_stats=_put(kept[r].batch_stats, slots[r], block.batch_stats) if keep_models else {},
          opt_state=_put(kept[r].opt_state, slots[r], block.opt_state) if keep_opt else {})
      if due:
        accs[r] = chunk_sums(block, weights[r], accs[r])
    return kept, accs

  return (jax.jit(_prepare, static_argnums=0),
          jax.jit(_finish, static_argnums=6, donate_argnums=(0, 1)))


_combine = jax.jit(combine_sums)


@jax.jit
def _spread(kept, model, heads):
  """After an aggregation with per-client models: every client takes the average."""
  out = {}
  for g, part in kept.items():
    n = jax.tree.leaves(part.params)[0].shape[0]
    avg = _stack_copies(_cut_variables(model, heads[g]), n)
    out[g] = PartState(params=avg.params, batch_stats=avg.batch_stats, opt_state=part.opt_state)
  return out


def averaging(ctx: Context) -> Algorithm:
  """Hetero-SplitEE Averaging: a server part per client, all in parallel,
  cross-layer aggregation every ``aggregate_every`` rounds.

  Args:
    ctx: the run's :class:`Context` (config, network, optimiser, fleet, train
      set, client runners); :func:`hsee_jax.build` makes one from a config.
  Returns:
    An :class:`Algorithm`: ``init(key)`` gives the state (one client part and
    one server part per client, stored per cut), ``apply(state, cohort)``
    trains one round of the cohort's clients.
  """
  cfg, net, tx, fleet = ctx.cfg, ctx.net, ctx.tx, ctx.fleet
  keep_opt = cfg.client_state == "keep"
  keep_models = cfg.aggregate_every > 1  # clients' models differ between aggregations

  def init(key) -> AveragingState:
    """Every unit starts from the same weights wherever it is held (unit k's
    init depends on (key, k) only; an exit head's on (key, cut))."""
    p, s = net.init_span(key, *net.full_span(), ctx.image_shape)
    model = PartState(params=p, batch_stats=s, opt_state={})
    heads, clients = {}, {}
    for cut, ids in fleet.groups.items():
      hp, hs = net.init_exit_head(key, cut, ctx.image_shape)
      heads[group_key(cut)] = PartState(params=hp, batch_stats=hs, opt_state={})
      full = _cut_variables(model, heads[group_key(cut)])
      kept = PartState(params=full.params if keep_models else {},
                       batch_stats=full.batch_stats if keep_models else {},
                       opt_state=_opt_init(tx, full.params) if keep_opt else {})
      clients[group_key(cut)] = _stack_copies(kept, len(ids))
    return AveragingState(model=model, exit_heads=heads, clients=clients)

  prepare, finish = shared_program(("averaging", ctx.program_key),
                                   lambda: _averaging_programs(tx, keep_opt, keep_models))

  def run(states: list, cohorts: list, ctxs: list):
    """One round of R runs (same round, same fleet shape, one ``Shared``):
    chunk i of a cut is the i-th chunk of every run's clients at that cut
    (padded to the largest), one block per run."""
    rnd = cohorts[0].round
    if any(c.round != rnd for c in cohorts):
      raise ValueError(f"runs stacked in one round must be at the same round: "
                       f"{[c.round for c in cohorts]}")
    due = (rnd + 1) % cfg.aggregate_every == 0
    n_runs = len(states)
    kept = [dict(st.clients) for st in states]
    sums = [{} for _ in states]
    bases = np.cumsum([0] + [c.size for c in cohorts])
    metrics = jnp.zeros((int(bases[-1]), len(METRIC_NAMES)), jnp.float32)
    for cut in sorted({int(c) for co in cohorts for c in np.unique(co.cuts)}):
      g = group_key(cut)
      positions = [np.flatnonzero(co.cuts == cut) for co in cohorts]
      pad = cfg.samples_clients and ctx.runners[cut].stacked
      plans = [chunk_plan(len(p), ctx.chunk, pad) for p in positions]
      starts = [0] * n_runs
      for i in range(max(map(len, plans))):
        k = max(p[i][1] for p in plans if i < len(p))
        slots, weights, xs, keys, where = [], [], [], [], []
        for r, (co, cx) in enumerate(zip(cohorts, ctxs)):
          real = plans[r][i][0] if i < len(plans[r]) else 0
          pos = positions[r][starts[r]:starts[r] + real]
          starts[r] += real
          padded = np.concatenate([pos, np.full(k - real, pos[0] if real else 0)])
          slots.append(np.concatenate([co.slots[pos], np.full(k - real, len(cx.fleet.groups[cut]))]))
          weights.append(np.concatenate([co.weights[pos], np.zeros(k - real, np.float32)]))
          xs.append(step_inputs(cx, co, padded))
          keys.append(co.keys[padded])
          where.append(np.concatenate([bases[r] + pos, np.full(k - real, bases[-1])]))
        slots, weights = np.stack(slots), np.stack(weights)
        xs = tuple(np.concatenate(a) for a in zip(*xs))
        client, server = prepare(cut, [st.model for st in states], [st.exit_heads[g] for st in states],
                                 [kp[g] for kp in kept], slots)
        (client, server), xs, keys = ctx.place(((client, server), xs, np.concatenate(keys)),
                                               n_runs * k)
        (client, server), m = ctx.runners[cut](ctx.shared, (client, server, keys), xs)
        new_kept, new_sums = finish([kp[g] for kp in kept], [sm.get(cut) for sm in sums],
                                    client, server, weights, slots, due)
        for r in range(n_runs):
          kept[r][g], sums[r][cut] = new_kept[r], new_sums[r]
        metrics = _scatter_rows(metrics, m, np.concatenate(where))
    out = []
    for r, st in enumerate(states):
      model, heads = st.model, st.exit_heads
      if due:
        model, heads = _combine(model, heads, sums[r])
        if keep_models:
          kept[r] = _spread(kept[r], model, heads)
      out.append(AveragingState(model=model, exit_heads=heads, clients=kept[r]))
    if n_runs == 1:
      return out, [metrics]
    return out, [metrics[bases[r]:bases[r + 1]] for r in range(n_runs)]

  def apply(state: AveragingState, cohort: Cohort):
    (new,), (metrics,) = run([state], [cohort], [ctx])
    return new, metrics

  def eval_models(state: AveragingState) -> list[EvalModel]:
    out = []
    for cut, ids in fleet.groups.items():
      g = group_key(cut)
      if keep_models:  # clients differ: a seeded sample of them
        for i in ctx.eval_sample(cut):
          full = _take(state.clients[g], int(fleet.slots[i]))
          out.append(EvalModel(cut, (int(i),), *full.split(cut), False))
        continue
      full = _cut_variables(state.model, state.exit_heads[g])
      out.append(EvalModel(cut, tuple(int(i) for i in ids), *full.split(cut), True))
    return out

  def nonfinite_parts(state: AveragingState, ids=None) -> list[str]:
    flags = jax.device_get(_finite({
        **{f"model {n}": (p, state.model.batch_stats.get(n, {})) for n, p in state.model.params.items()},
        **{f"exit head of cut {g.split('_')[1]}": (h.params, h.batch_stats)
           for g, h in state.exit_heads.items()}}))
    bad = [name for name, ok in flags.items() if not ok]
    if keep_models:
      bad += _bad_rows(ctx, state.clients, "model", ids)
    return bad

  stack_key = ("averaging", ctx.program_key, ctx.mode, ctx.chunk, cfg.samples_clients,
               tuple((c, len(ids)) for c, ids in fleet.groups.items()), id(ctx.shared),
               ctx.mesh is None)
  return Algorithm("averaging", init, apply, eval_models, nonfinite_parts,
                   _per_client_bytes(ctx, init), stack_key, run, ctx)


# -- Sequential ----------------------------------------------------------------------------
def _sequential_programs(tx, keep_opt: bool):
  """The jitted helpers of a Sequential round: (take, put) one client's part."""
  def take(part, slot):
    one = _take(part, slot)
    return one if keep_opt else one.replace(opt_state=_opt_init(tx, one.params))

  def put(part, slot, one):
    return _put(part, slot, one if keep_opt else one.replace(opt_state={}))

  return jax.jit(take), jax.jit(put, donate_argnums=0)


@jax.jit
def _average_clients(clients, weights):
  """``client_aggregation=cross_layer``: cross-layer average of the client parts."""
  return cross_layer_average(clients, weights)


def sequential(ctx: Context) -> Algorithm:
  """Hetero-SplitEE Sequential: one shared server part; the cohort's clients
  take turns with it, and it continues from each client's cut (only units
  cut+1..L and the classifier are updated for that client).

  Args:
    ctx: the run's :class:`Context` (as for :func:`averaging`).
  Returns:
    An :class:`Algorithm` whose state holds each client's client part and
    one server part for the whole network.
  """
  cfg, net, tx, fleet = ctx.cfg, ctx.net, ctx.tx, ctx.fleet
  keep_opt = cfg.client_state == "keep"
  min_cut = min(fleet.groups)

  def init(key) -> SequentialState:
    clients = {}
    for cut, ids in fleet.groups.items():
      p, s = net.init_span(key, *net.client_span(cut), ctx.image_shape)
      part = PartState(params=p, batch_stats=s, opt_state=_opt_init(tx, p) if keep_opt else {})
      clients[group_key(cut)] = _stack_copies(part, len(ids))
    p, s = net.init_span(key, *net.server_span(min_cut), ctx.image_shape)
    return SequentialState(clients=clients,
                           server=PartState(params=p, batch_stats=s, opt_state=_opt_init(tx, p)))

  take, put = shared_program(("sequential", ctx.program_key),
                             lambda: _sequential_programs(tx, keep_opt))
  weights = {group_key(c): jnp.asarray(fleet.sizes[ids]) for c, ids in fleet.groups.items()}

  def apply(state: SequentialState, cohort: Cohort):
    clients, server = dict(state.clients), state.server
    metrics = []
    for pos in range(cohort.size):
      cut = int(cohort.cuts[pos])
      g, slot = group_key(cut), int(cohort.slots[pos])
      client = take(clients[g], slot)
      sub = server.split(cut)[1]
      xs = step_inputs(ctx, cohort, pos)  # host arrays: sliced per step for free
      (client, sub), m = ctx.runners[cut].one(ctx.shared, (client, sub, cohort.keys[pos]), xs)
      clients[g] = put(clients[g], slot, client)
      server = server.merge(sub)
      metrics.append(m)
    if cfg.client_aggregation == "cross_layer" and (cohort.round + 1) % cfg.aggregate_every == 0:
      clients = _average_clients(clients, weights)
    return SequentialState(clients=clients, server=server), jnp.stack(metrics)

  def eval_models(state: SequentialState) -> list[EvalModel]:
    out = []
    for cut in fleet.groups:
      sub = state.server.split(cut)[1]
      for i in ctx.eval_sample(cut):
        out.append(EvalModel(cut, (int(i),), _take(state.clients[group_key(cut)], int(fleet.slots[i])),
                             sub, False))
    return out

  def nonfinite_parts(state: SequentialState, ids=None) -> list[str]:
    bad = _bad_rows(ctx, state.clients, "client part", ids)
    if not _finite({"server": (state.server.params, state.server.batch_stats)})["server"]:
      bad.append("shared server part")
    return bad

  return Algorithm("sequential", init, apply, eval_models, nonfinite_parts,
                   _per_client_bytes(ctx, init), ctx=ctx)


STRATEGIES = {"averaging": averaging, "sequential": sequential}
