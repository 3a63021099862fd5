"""The fleet of clients, the cohort sampled each round, and a round's inputs.

A *fleet* is N clients, each with a cut layer, a data partition and a compute
speed (for the simulated clock). The cuts come from the config: one per client
(``cuts``, or ``client_budgets`` turned into cuts), or device tiers
(``cut_tiers`` / ``budget_tiers``: a cut or a budget and a share of the fleet)
assigned to clients by a seeded draw.

Each round a *cohort* of C clients trains. Like FedJAX's
``UniformGetClientSampler``, it is drawn uniformly without replacement as a
pure function of (seed, round), so a resumed run samples exactly what the
straight run sampled; with C = N every client trains every round, in id order.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import numpy as np

from hsee_jax import costs
from hsee_jax import data as data_lib
from hsee_jax import models
from hsee_jax.config import Config, ConfigError


class FleetError(ValueError):
  """A fleet that cannot be built; one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class Fleet:
  """N clients: cut layer, data partition, FLOP/s and link bandwidth of each (index = client id)."""
  cuts: np.ndarray               # int [N]
  partitions: tuple              # N index arrays into the training set
  flops_per_s: np.ndarray        # float [N] (simulated clock)
  reasons: tuple = ()            # budget -> cut explanations, one per tier or client
  link_bytes_per_s: np.ndarray | None = None  # float [N] each client's bandwidth (simulated clock)

  @property
  def num_clients(self) -> int:
    """N, the clients of the fleet."""
    return len(self.cuts)

  @functools.cached_property
  def data_sizes(self) -> np.ndarray:
    """Data size of every client: the weight of its models in every average."""
    return np.array([len(p) for p in self.partitions], np.float32)

  @functools.cached_property
  def groups(self) -> dict[int, np.ndarray]:
    """Distinct cut -> the ids of the clients at that cut, ascending."""
    return {int(c): np.flatnonzero(self.cuts == c) for c in np.unique(self.cuts)}

  @functools.cached_property
  def slots(self) -> np.ndarray:
    """Each client's row in its cut group's per-client state."""
    out = np.zeros(self.num_clients, np.int64)
    for ids in self.groups.values():
      out[ids] = np.arange(len(ids))
    return out

  def describe(self) -> dict:
    """What ``fleet.json`` holds: every client's cut, data size, FLOP/s and
    bandwidth, and the tiers."""
    return {"num_clients": self.num_clients,
            "clients_per_cut": {str(c): int(len(i)) for c, i in self.groups.items()},
            "cuts": self.cuts.tolist(), "data_sizes": self.data_sizes.astype(int).tolist(),
            "flops_per_s": self.flops_per_s.tolist(),
            "link_bytes_per_s": (None if self.link_bytes_per_s is None
                                 else self.link_bytes_per_s.tolist()),
            "reasons": list(self.reasons)}


def tier_counts(shares, n: int) -> np.ndarray:
  """Clients per tier: ``n * share`` rounded by largest remainder (sums to ``n``)."""
  raw = np.asarray(shares, np.float64) * n
  counts = np.floor(raw).astype(int)
  order = np.argsort(-(raw - counts), kind="stable")
  counts[order[:n - counts.sum()]] += 1
  return counts


def assign_tiers(shares, n: int, seed: int) -> np.ndarray:
  """Tier index of each of ``n`` clients: exact counts, seeded order."""
  tiers = np.repeat(np.arange(len(shares)), tier_counts(shares, n))
  return np.random.default_rng([seed, 5]).permutation(tiers)


def build_fleet(cfg: Config, dataset: data_lib.Dataset,
                log: Callable[[str], None] | None = None) -> Fleet:
  """The config's fleet on ``dataset``: cuts, partitions and speeds."""
  n = cfg.fleet_size
  reasons: list[str] = []
  tier = None
  if cfg.cut_tiers or cfg.budget_tiers:
    tiers = cfg.cut_tiers or cfg.budget_tiers
    tier = assign_tiers([t[1] for t in tiers], n, cfg.seed)
    tier_cuts = [t[0] for t in tiers]
    if cfg.budget_tiers:
      tier_cuts = _budget_cuts(cfg, dataset, [t[0] for t in tiers], "tier", reasons)
    cuts = np.asarray(tier_cuts, np.int64)[tier]
  elif cfg.client_budgets:
    cuts = np.asarray(_budget_cuts(cfg, dataset, cfg.client_budgets, "client", reasons), np.int64)
  else:
    cuts = np.asarray(cfg.cuts, np.int64)
  for r in reasons:
    (log or (lambda s: None))(f"[hsee] {r}")
  if cfg.static_cuts() is None:   # budgets chose the cuts: the rule for companion fields again
    try:
      cfg.check_effects(np.unique(cuts).tolist())
    except ConfigError as e:
      raise FleetError(f"{e} (the budgets give every client cut {int(cuts[0])})") from None
  try:
    partitions = data_lib.partition(dataset.train_labels, n, cfg.partition,
                                    cfg.dirichlet_alpha, cfg.seed)
  except data_lib.DataError as e:
    raise FleetError(str(e)) from None
  rng = np.random.default_rng([cfg.seed, 19])
  flops = _speeds(cfg.client_flops_per_s, DEFAULT_FLOPS_PER_S, tier, n, cfg.speed_spread, rng)
  link = _speeds(cfg.client_link_bytes_per_s, cfg.link_bytes_per_s, tier, n, cfg.speed_spread, rng)
  return Fleet(cuts, tuple(partitions), flops, tuple(reasons), link)


DEFAULT_FLOPS_PER_S = 1e10


def _speeds(given: tuple, default: float, tier, n: int, spread: float, rng) -> np.ndarray:
  """Each client's figure: ``given`` per client (N values) or per tier (T
  values; Config refuses N = T as ambiguous), else ``default``; with ``spread`` > 0 drawn lognormal
  around it (the figure is the median: ``figure * exp(spread * z)``)."""
  figures = np.full(n, float(default))
  if given:
    given = np.asarray(given, np.float64)
    figures = given if len(given) == n else given[tier]   # Config refuses N = T
  if spread > 0:
    figures = figures * np.exp(spread * rng.standard_normal(n))
  return figures


def _budget_cuts(cfg, dataset, budgets, what: str, reasons: list) -> list[int]:
  net = models.for_config(cfg, dataset.num_classes)
  try:
    choices = costs.choose_cuts(net, dataset.image_shape, budgets, cfg.batch_size)
  except ValueError as e:
    raise FleetError(f"{'budget_tiers' if what == 'tier' else 'client_budgets'}: "
                     f"{str(e).replace('client', what)}") from None
  reasons.extend(f"{what} {c['client']}: {c['reason']}" for c in choices)
  return [c["cut"] for c in choices]


def sample_cohort(seed: int, rnd: int, num_clients: int, cohort_size: int) -> np.ndarray:
  """Client ids of round ``rnd``'s cohort, ascending: uniform without
  replacement, a pure function of (seed, round); everyone when C = N."""
  if cohort_size >= num_clients:
    return np.arange(num_clients)
  rng = np.random.default_rng([seed, 13, rnd])
  return np.sort(rng.choice(num_clients, cohort_size, replace=False))


# The per-step hyperparameters a cohort feeds the compiled step (Cohort.hparams),
# then the variants' own (hsee_jax.variants, ``hparams``). With
# participation=partial, a further column per client and step: 1 where the
# client does the step, 0 past what fits its deadline (the step changes nothing).
HPARAMS = ("lr", "momentum", "weight_decay", "exit_loss_weight")


def online(cfg: Config, rnd: int, num_clients: int) -> np.ndarray:
  """Ids of the clients online in round ``rnd``: each with probability
  ``cfg.availability``, a pure function of (seed, round); all when it is 1."""
  if cfg.availability >= 1:
    return np.arange(num_clients)
  return np.flatnonzero(np.random.default_rng([cfg.seed, 23, rnd]).random(num_clients)
                        < cfg.availability)


def tier_quotas(cuts: np.ndarray, cohort: int) -> dict[int, int]:
  """Cut -> how many of ``cohort`` places its clients get, in proportion to
  its share of ``cuts`` (the sampled clients' cuts): the floors, then one
  more for the largest remainders (ties to the lower cut), summing to
  ``min(cohort, len(cuts))``."""
  tiers, counts = np.unique(cuts, return_counts=True)
  total = min(cohort, len(cuts))
  exact = counts * total / max(1, len(cuts))
  quota = np.floor(exact + 1e-9).astype(int)
  for j in np.argsort(-(exact - quota), kind="stable")[:total - quota.sum()]:
    quota[j] += 1
  return {int(c): int(q) for c, q in zip(tiers, quota)}


@dataclasses.dataclass(frozen=True)
class Turnout:
  """Who takes part in a round and what the round costs (:func:`participants`).

  ``ids`` the clients that train, ascending; ``steps`` each one's local
  steps (None: all of them); ``dropped`` the sampled clients that missed
  the deadline (not done within ``deadline_s``; under ``partial``, no step
  fits); ``unused`` the sampled clients done within the deadline but not
  needed (over-commitment: the cohort, or their tier's share, was full
  before they finished); ``online`` how many clients were online;
  ``seconds`` and ``bytes`` the round on the simulated clock and the link.
  """
  ids: np.ndarray
  steps: np.ndarray | None
  dropped: np.ndarray
  unused: np.ndarray
  online: int
  seconds: float
  bytes: int


def participants(fleet: Fleet, cfg: Config, rnd: int, clock, local_steps: int) -> Turnout:
  """Who trains in round ``rnd``, by ``cfg.participation``, and what the
  round costs on ``clock`` (:class:`hsee_jax.costs.Clock`; the rule is
  docs/usage.md's "The simulated clock").

  * ``all``: the cohort (:func:`sample_cohort`, from the online clients);
    the round is :meth:`Clock.round_seconds` of it.
  * ``deadline``: ``ceil(overcommit * C)`` online clients sampled; of those
    done within ``deadline_s``, the first C to finish kept (FedScale's
    over-commitment); with ``deadline_by_tier`` each cut's share of the C
    (:func:`tier_quotas`) is the first of that cut to finish. The round
    ends when the last kept client is done, if that filled the cohort (every
    tier's share); else the server waited: it lasts until the deadline. On
    the link: the kept clients' steps and client parts, and the steps every
    other sampled client finished before the round ended.
  * ``partial``: the cohort, each client doing the local steps that fit in
    ``deadline_s`` with its transfer (FedProx's partial work); a client
    with none is dropped and sends nothing, and the server waits for it
    until the deadline.

  Nobody online: nothing happens, 0 s.
  """
  ids = online(cfg, rnd, fleet.num_clients)
  num_online = len(ids)
  want = cfg.cohort_size
  if cfg.participation == "deadline":
    want = min(len(ids), math.ceil(cfg.overcommit * cfg.cohort_size - 1e-9))
  if len(ids) == fleet.num_clients:
    ids = sample_cohort(cfg.seed, rnd, fleet.num_clients, want)
  elif want < len(ids):
    ids = np.sort(np.random.default_rng([cfg.seed, 13, rnd]).choice(ids, want, replace=False))
  aggregate = cfg.aggregates_after(rnd)
  none = ids[:0]
  if cfg.participation == "all":
    return Turnout(ids, None, none, none, num_online, clock.round_seconds(ids, local_steps, aggregate),
                   clock.round_bytes(ids, local_steps, aggregate))
  if cfg.participation == "partial":
    steps = clock.steps_within(ids, cfg.deadline_s, local_steps, aggregate)
    kept = steps > 0
    seconds = clock.round_seconds(ids[kept], steps[kept], aggregate)
    if not kept.all():
      seconds = max(seconds, cfg.deadline_s)
    return Turnout(ids[kept], steps[kept], ids[~kept], none, num_online, seconds,
                   clock.round_bytes(ids[kept], steps[kept], aggregate))
  done = clock.client_seconds(ids, local_steps, aggregate)
  order = np.argsort(done, kind="stable")
  in_time = order[done[order] <= cfg.deadline_s]
  if cfg.deadline_by_tier:
    cuts = fleet.cuts[ids]
    shares = tier_quotas(cuts, cfg.cohort_size)
    per_tier = [in_time[cuts[in_time] == c][:q] for c, q in shares.items()]
    kept = np.concatenate(per_tier + [none]).astype(np.int64)
    full = all(len(k) == q for k, q in zip(per_tier, shares.values()))
  else:
    kept = in_time[:cfg.cohort_size]
    full = len(kept) == min(cfg.cohort_size, len(ids))
  is_kept, is_in_time = np.zeros(len(ids), bool), np.zeros(len(ids), bool)
  is_kept[kept], is_in_time[in_time] = True, True
  seconds = clock.round_seconds(ids[is_kept], local_steps, aggregate)
  if not full:   # the server waited for the clients it asked for until the deadline
    seconds = max(seconds, cfg.deadline_s)
  others = ids[~is_kept]
  sent = clock.round_bytes(ids[is_kept], local_steps, aggregate) + clock.round_bytes(
      others, clock.steps_within(others, seconds, local_steps, False), False)
  return Turnout(ids[is_kept], None, ids[~is_in_time], ids[is_in_time & ~is_kept], num_online,
                 seconds, sent)


def step_hparams(cfg: Config, rnd: int, lrs, extra: tuple = ()) -> np.ndarray:
  """[S, H]: every step's :data:`HPARAMS` in round ``rnd`` (0-based), with the
  scheduled learning rates ``lrs`` [S], then the variants' own: ``extra``,
  ``((name, value(cfg, rnd)), ...)``."""
  values = [cfg.momentum, cfg.weight_decay, cfg.exit_loss_weight] + [f(cfg, rnd) for _, f in extra]
  return np.stack([np.asarray(lrs, np.float32)] + [np.full(len(lrs), v, np.float32)
                                                   for v in values], axis=-1)


@dataclasses.dataclass(frozen=True)
class Cohort:
  """One round's clients and their inputs (host arrays; positions = cohort order).

  ``ids`` [C] client ids, ascending; ``cuts`` [C]; ``slots`` [C] each client's
  row in its cut group's per-client state; ``indices`` [C, S, B] the training
  images of every local step; ``hparams`` [S, H] the hyperparameters of every
  step (:data:`HPARAMS`: the scheduled learning rate, momentum, weight decay,
  exit-loss weight, then the variants' own; :func:`step_hparams`), inputs of the compiled step rather than constants in it;
  ``weights`` [C] data sizes; ``keys`` [C, 2] PRNG keys (uint32);
  ``active`` [C, S] (participation=partial, else None) whether each client
  does each step; ``dropped`` the ids sampled that missed the deadline,
  ``unused`` those in time but not needed (over-commitment), ``online``
  how many clients were online (:class:`Turnout`); ``sim_seconds`` and
  ``bytes_sent``: the round on the simulated clock
  (:class:`hsee_jax.costs.Clock`) and on the link.
  """
  round: int
  ids: np.ndarray
  cuts: np.ndarray
  slots: np.ndarray
  indices: np.ndarray
  hparams: np.ndarray
  weights: np.ndarray
  keys: np.ndarray
  active: np.ndarray | None = None
  dropped: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  unused: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  online: int = 0
  sim_seconds: float = 0.0
  bytes_sent: int = 0

  @property
  def size(self) -> int:
    return len(self.ids)


@jax.jit
def _client_keys(base_key, rnd, ids):
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(base_key, rnd), ids)


def make_cohort(fleet: Fleet, cfg: Config, rnd: int, local_steps: int, schedule,
                base_key, clock, extra_hparams: tuple = ()) -> Cohort:
  """Round ``rnd``'s cohort: who trains (:func:`participants`), on which
  images, at which rates, with which keys, and what the round takes on
  ``clock`` (:class:`hsee_jax.costs.Clock`). Data order and keys are pure
  functions of (seed, round, client)."""
  turnout = participants(fleet, cfg, rnd, clock, local_steps)
  ids, steps = turnout.ids, turnout.steps
  indices = np.stack([data_lib.client_batches(fleet.partitions[i], local_steps, cfg.batch_size,
                                              cfg.seed, rnd, int(i)) for i in ids]
                     or [np.zeros((local_steps, cfg.batch_size), np.int64)])[:len(ids)]
  global_steps = rnd * local_steps + np.arange(local_steps)
  lrs = np.asarray([schedule(int(s)) for s in global_steps], np.float32)
  hparams = step_hparams(cfg, rnd, lrs, extra_hparams)
  keys = np.asarray(_client_keys(base_key, rnd, ids.astype(np.int32)))
  active = None if steps is None else np.arange(local_steps)[None, :] < steps[:, None]
  return Cohort(round=rnd, ids=ids, cuts=fleet.cuts[ids], slots=fleet.slots[ids],
                indices=indices, hparams=hparams, weights=fleet.data_sizes[ids], keys=keys,
                active=active, dropped=turnout.dropped, unused=turnout.unused,
                online=turnout.online, sim_seconds=turnout.seconds, bytes_sent=turnout.bytes)

