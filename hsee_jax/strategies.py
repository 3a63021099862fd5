"""Hetero-SplitEE training: the client update, Sequential and Averaging.

The split update (PAPER.md, "Training"): per minibatch,

* client: ``loss_c = CE(exit_head(client_part(x)), y)`` updates client part + exit head;
* server: ``loss_s = CE(server_part(stop_gradient(h)), y)``, ``h = client_part(x)``,
  updates server part + classifier.

Both come from one ``value_and_grad`` of ``w * loss_c + loss_s`` (w = exit_loss_weight) over (client,
server) parameters: ``loss_c`` does not touch the server, and the
``stop_gradient`` keeps ``loss_s`` out of the client unless
``server_grad_to_client`` (classical split learning) is set.

Clients that share a cut layer form a *group*, stacked on a leading client
axis: ``state.clients["cut_3"]`` is a :class:`PartState` whose leaves are
[K_3, ...]. Averaging keeps one server part per client, stacked the same way
in ``state.servers["cut_3"]``; Sequential keeps one shared server part in
``state.servers["shared"]`` holding units min(cuts)+1..9 and the classifier.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hsee_jax import data as data_lib
from hsee_jax import models
from hsee_jax.config import NUM_UNITS, Config, ConfigError
from hsee_jax.engine import ClientRunner, ClientUpdate, tree_set, tree_slice, tree_stack
from hsee_jax.optim import PartState, apply_gradients, init_part

SHARED_SERVER = "shared"
METRIC_NAMES = ("loss_client", "loss_server", "acc_client", "acc_server")


def group_key(cut: int) -> str:
  return f"cut_{cut}"


@flax.struct.dataclass
class HSEEState:
  clients: dict  # group_key(cut) -> PartState, leaves [K_cut, ...]
  servers: dict  # averaging: group_key(cut) -> stacked PartState; sequential: {"shared": PartState}


@dataclasses.dataclass(frozen=True)
class Shared:
  """What every client update reads: the train set on device and its statistics."""
  images: Any
  labels: Any
  mean: Any
  std: Any


jax.tree_util.register_dataclass(Shared, data_fields=["images", "labels", "mean", "std"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which client has which cut, and where it sits in its group's stack."""
  cuts: tuple

  @property
  def groups(self) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, c in enumerate(self.cuts):
      out.setdefault(c, []).append(i)
    return dict(sorted(out.items()))

  def position(self, client: int) -> tuple[int, int]:
    cut = self.cuts[client]
    return cut, self.groups[cut].index(client)


def server_names(cut: int) -> list[str]:
  return [models.unit_name(k) for k in range(cut + 1, NUM_UNITS + 1)] + [models.CLASSIFIER]


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def split_update(net: models.SplitResNet18, tx: optax.GradientTransformation, cfg: Config,
                 cut: int) -> ClientUpdate:
  """The Hetero-SplitEE client update for a client at ``cut``.

  state: ``(client PartState, server PartState, PRNG key)``;
  per-step input: ``(indices [B], lr)``; output: ``((client, server), metrics[4])``,
  the metrics averaged over the local steps (``METRIC_NAMES``).
  """
  c_first, c_last, c_head = models.client_span(cut)
  s_first, s_last, s_head = models.server_span(cut)

  def init(shared, state):
    client, server, key = state
    return client, server, key, jnp.zeros(len(METRIC_NAMES)), jnp.zeros(())

  def step(shared, carry, x):
    client, server, key, msum, n = carry
    idx, lr = x
    key, aug_key = jax.random.split(key)
    images = shared.images[idx]
    labels = shared.labels[idx]
    if cfg.augment:
      images = data_lib.augment(aug_key, images)
    images = data_lib.normalize(images, shared.mean, shared.std)

    def loss_fn(client_params, server_params):
      h, exit_logits, c_stats = net.apply_span(client_params, client.batch_stats, images,
                                               c_first, c_last, c_head, train=True)
      h_in = h if cfg.server_grad_to_client else jax.lax.stop_gradient(h)
      _, logits, s_stats = net.apply_span(server_params, server.batch_stats, h_in,
                                          s_first, s_last, s_head, train=True)
      loss_c = _cross_entropy(exit_logits, labels)
      loss_s = _cross_entropy(logits, labels)
      metrics = jnp.stack([loss_c, loss_s, _accuracy(exit_logits, labels),
                           _accuracy(logits, labels)])
      return cfg.exit_loss_weight * loss_c + loss_s, (metrics, c_stats, s_stats)

    (_, (metrics, c_stats, s_stats)), (g_client, g_server) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(client.params, server.params)
    client = apply_gradients(tx, client, g_client, lr, c_stats)
    server = apply_gradients(tx, server, g_server, lr, s_stats)
    return client, server, key, msum + metrics, n + 1

  def final(shared, carry):
    client, server, _, msum, n = carry
    return (client, server), msum / n

  return ClientUpdate(init, step, final)


# -- state ----------------------------------------------------------------------
def _stack_copies(tree, k: int):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), tree)


def init_state(cfg: Config, net: models.SplitResNet18, tx, key, image_shape) -> HSEEState:
  """All models start from the same per-unit weights (unit k's init depends on
  (key, k) only), so every copy of unit k is equal at round 0."""
  layout = Layout(cfg.cuts)
  clients, servers = {}, {}
  for cut, members in layout.groups.items():
    p, s = net.init_span(key, *models.client_span(cut), image_shape)
    clients[group_key(cut)] = _stack_copies(init_part(tx, p, s), len(members))
    if cfg.strategy == "averaging":
      p, s = net.init_span(key, *models.server_span(cut), image_shape)
      servers[group_key(cut)] = _stack_copies(init_part(tx, p, s), len(members))
  if cfg.strategy == "sequential":
    p, s = net.init_span(key, *models.server_span(min(cfg.cuts)), image_shape)
    servers[SHARED_SERVER] = init_part(tx, p, s)
  return HSEEState(clients=clients, servers=servers)


# -- cross-layer aggregation ------------------------------------------------------------
def cross_layer_average(parts: dict[str, PartState], weights: dict[str, Any]) -> dict[str, PartState]:
  """Average every unit over all the models that hold a copy of it.

  ``parts`` maps a name to a stacked PartState (client parts and/or server
  parts of one or more groups); ``weights[name]`` is the [K] data size of its
  clients. For each unit and the final classifier, the parameters and batch
  statistics of every copy are averaged, weighted by data size, and written
  back to every copy. Exit heads are averaged only within a part's own stack
  (clients that share a cut); optimiser states stay local.
  """
  def weighted_sum(tree, w):
    return jax.tree.map(lambda a: jnp.tensordot(w.astype(a.dtype), a, axes=1), tree)

  names = sorted({n for part in parts.values() for n in part.params})
  new = {k: (dict(p.params), dict(p.batch_stats)) for k, p in parts.items()}
  for name in names:
    holders = [k for k, p in parts.items() if name in p.params]
    if name == models.EXIT_HEAD:
      groups = [[k] for k in holders]
    else:
      groups = [holders]
    for group in groups:
      total = sum(jnp.sum(weights[k]) for k in group)
      summed = None
      for k in group:
        leaf = (parts[k].params[name], parts[k].batch_stats.get(name, {}))
        s = weighted_sum(leaf, weights[k])
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


def aggregate(state: HSEEState, weights: dict[str, Any], include_servers: bool) -> HSEEState:
  """Cross-layer aggregation of a whole state (``weights``: group_key -> [K])."""
  parts = {f"client/{k}": v for k, v in state.clients.items()}
  w = {f"client/{k}": weights[k] for k in state.clients}
  if include_servers:
    parts.update({f"server/{k}": v for k, v in state.servers.items()})
    w.update({f"server/{k}": weights[k] for k in state.servers})
  out = cross_layer_average(parts, w)
  clients = {k: out[f"client/{k}"] for k in state.clients}
  servers = ({k: out[f"server/{k}"] for k in state.servers} if include_servers
             else state.servers)
  return HSEEState(clients=clients, servers=servers)


@jax.jit
def _finite_flags(state: HSEEState) -> dict:
  """Per part (and per client of a stack): are all its arrays finite?"""
  def flag(part: PartState, stacked: bool):
    leaves = jax.tree.leaves((part.params, part.batch_stats))
    if stacked:  # one flag per client of the stack
      return jnp.all(jnp.stack([jnp.isfinite(a.reshape(a.shape[0], -1)).all(1) for a in leaves]), 0)
    return jnp.all(jnp.stack([jnp.isfinite(a).all() for a in leaves]))
  return {"clients": {g: flag(p, True) for g, p in state.clients.items()},
          "servers": {g: flag(p, g != SHARED_SERVER) for g, p in state.servers.items()}}


# -- rounds -------------------------------------------------------------------------------
class Strategy:
  """Static parts of a run (network, optimiser, layout, compiled runners) and
  the round function ``run_round(state, rnd) -> (state, per-client metrics)``."""

  def __init__(self, cfg: Config, net: models.SplitResNet18, tx, dataset: data_lib.Dataset,
               partitions: list[np.ndarray], local_steps: int, schedule):
    self.cfg, self.net, self.tx = cfg, net, tx
    self.layout = Layout(cfg.cuts)
    self.partitions = partitions
    self.local_steps = local_steps
    self.schedule = schedule
    self.shared = Shared(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels),
                         jnp.asarray(dataset.mean), jnp.asarray(dataset.std))
    # Sequential runs one client at a time (the server is shared): never stacked
    mode = "loop" if cfg.strategy == "sequential" and cfg.mode == "auto" else cfg.mode
    self.runners = {cut: ClientRunner(split_update(net, tx, cfg, cut), mode)
                    for cut in self.layout.groups}
    sizes = np.array([len(p) for p in partitions], np.float32)
    self.weights = {group_key(c): jnp.asarray(sizes[m]) for c, m in self.layout.groups.items()}
    self._aggregate = jax.jit(aggregate, static_argnums=2)
    self.mesh = None
    if cfg.shard_clients:
      if cfg.strategy != "averaging" or not self.runners[cfg.cuts[0]].stacked:
        raise ConfigError("shard_clients: needs strategy=averaging and mode=vmap or unrolled")
      self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("clients",))

  def client_sharding(self, k: int):
    """Stacks of ``k`` clients are laid over the mesh's client axis when ``k``
    divides evenly; otherwise they stay replicated."""
    spec = P("clients") if k % self.mesh.devices.size == 0 else P()
    return NamedSharding(self.mesh, spec)

  def place(self, state: HSEEState) -> HSEEState:
    """Put each group's stack on the device mesh (no-op without shard_clients)."""
    if self.mesh is None:
      return state
    put = lambda tree: jax.tree.map(
        lambda a: jax.device_put(a, self.client_sharding(a.shape[0])), tree)
    return HSEEState(clients=put(state.clients), servers=put(state.servers))

  def init_state(self, key) -> HSEEState:
    return self.place(self._init_unplaced(key))

  def _init_unplaced(self, key) -> HSEEState:
    return init_state(self.cfg, self.net, self.tx, key, self.shared.images.shape[1:])

  def abstract_state(self) -> HSEEState:
    """Shapes and dtypes of the state (for restoring checkpoints)."""
    return jax.eval_shape(self._init_unplaced, jax.random.PRNGKey(0))

  def client_inputs(self, rnd: int, client: int, base_key):
    """Per-step inputs (indices [S, B], lr [S]) and the PRNG key of one client in one round."""
    idx = data_lib.client_batches(self.partitions[client], self.local_steps,
                                  self.cfg.batch_size, self.cfg.seed, rnd, client)
    steps = rnd * self.local_steps + np.arange(self.local_steps)
    lrs = np.asarray([self.schedule(int(s)) for s in steps], np.float32)
    key = jax.random.fold_in(jax.random.fold_in(base_key, rnd), client)
    return (jnp.asarray(idx), jnp.asarray(lrs)), key

  def aggregation_due(self, rnd: int) -> bool:
    return (rnd + 1) % self.cfg.aggregate_every == 0

  def run_round(self, state: HSEEState, rnd: int, base_key) -> tuple[HSEEState, np.ndarray]:
    if self.cfg.strategy == "averaging":
      state, metrics = self._averaging_round(state, rnd, base_key)
      if self.aggregation_due(rnd):
        state = self._aggregate(state, self.weights, True)
      state = self.place(state)  # keep the client axis on the mesh (no-op unsharded)
    else:
      state, metrics = self._sequential_round(state, rnd, base_key)
      if self.cfg.client_aggregation == "cross_layer" and self.aggregation_due(rnd):
        state = self._aggregate(state, self.weights, False)
    return state, metrics

  def _averaging_round(self, state, rnd, base_key):
    """All clients train in parallel, each with its own server part."""
    clients, servers = dict(state.clients), dict(state.servers)
    metrics = np.zeros((len(self.cfg.cuts), len(METRIC_NAMES)), np.float32)
    group_metrics = []  # read back after every group is dispatched, not between groups
    for cut, members in self.layout.groups.items():
      g = group_key(cut)
      inputs = [self.client_inputs(rnd, i, base_key) for i in members]
      xs = tree_stack([x for x, _ in inputs])
      keys = jnp.stack([k for _, k in inputs])
      if self.mesh is not None:
        xs, keys = jax.device_put((xs, keys), self.client_sharding(len(members)))
      (clients[g], servers[g]), m = self.runners[cut](self.shared, (clients[g], servers[g], keys), xs)
      group_metrics.append((members, m))
    for members, m in group_metrics:
      metrics[members] = np.asarray(m)
    return HSEEState(clients=clients, servers=servers), metrics

  def _sequential_round(self, state, rnd, base_key):
    """Clients take turns with the one shared server, which continues from each
    client's cut: only units cut+1..9 and the classifier are updated."""
    clients = dict(state.clients)
    server = state.servers[SHARED_SERVER]
    metrics = np.zeros((len(self.cfg.cuts), len(METRIC_NAMES)), np.float32)
    for i, cut in enumerate(self.cfg.cuts):
      g = group_key(cut)
      _, j = self.layout.position(i)
      xs, key = self.client_inputs(rnd, i, base_key)
      client = tree_slice(clients[g], j)
      sub = server.subset(server_names(cut))
      (client, sub), m = self.runners[cut].one(self.shared, (client, sub, key), xs)
      clients[g] = tree_set(clients[g], j, client)
      server = server.merge(sub)
      metrics[i] = np.asarray(m)
    return HSEEState(clients=clients, servers={SHARED_SERVER: server}), metrics

  def nonfinite_parts(self, state: HSEEState) -> list[str]:
    """Names of the parts holding a NaN or Inf parameter or batch statistic,
    e.g. ``client 2 (cut 7) client part`` or ``shared server part``."""
    flags = _finite_flags(state)
    bad = []
    for side, parts in (("client part", flags["clients"]), ("server part", flags["servers"])):
      for g, ok in parts.items():
        if g == SHARED_SERVER:
          if not bool(ok):
            bad.append("shared server part")
          continue
        cut = int(g.split("_")[1])
        for j, client in enumerate(self.layout.groups[cut]):
          if not bool(np.asarray(ok)[j]):
            bad.append(f"client {client} (cut {cut}) {side}")
    return bad

  # -- views used by evaluation ---------------------------------------------------------
  def client_and_server(self, state: HSEEState, client: int) -> tuple[PartState, PartState]:
    """Client ``client``'s part and the server part its activations go to."""
    cut, j = self.layout.position(client)
    c = tree_slice(state.clients[group_key(cut)], j)
    if self.cfg.strategy == "averaging":
      return c, tree_slice(state.servers[group_key(cut)], j)
    return c, state.servers[SHARED_SERVER].subset(server_names(cut))
