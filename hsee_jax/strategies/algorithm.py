"""A strategy as a value (:class:`Algorithm`, after FedJAX's
``FederatedAlgorithm``) and what both strategies are built from
(:class:`Context`), with the cache that lets runs in one process share
their compiled programs."""
from __future__ import annotations

import collections
import dataclasses
import types
from typing import Any, Callable

import jax
import numpy as np
import optax

from hsee_jax import config as config_lib
from hsee_jax import engine, models
from hsee_jax import link as link_lib
from hsee_jax import precision as precision_lib
from hsee_jax.config import Config, ConfigError
from hsee_jax.fleet import HPARAMS, Cohort, Fleet
from hsee_jax.optim import PartState
from hsee_jax.strategies.parts import group_key
from hsee_jax.strategies.update import TrainSet, exit_objective, preprocessing, split_update


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A strategy as a value: what :func:`hsee_jax.train.run_rounds` needs.

  * ``init(key) -> state``;
  * ``apply(state, cohort) -> (state, metrics [C, 4] on device)``: one
    round of the cohort's clients (:class:`hsee_jax.fleet.Cohort`); consumes
    ``state`` (its per-client buffers are donated);
  * ``eval_models(state) -> [EvalModel]``: what evaluation runs;
  * ``nonfinite_parts(state, ids=None) -> [str]``: parts holding a NaN or
    Inf (per-client parts: of clients ``ids`` only, when given);
  * ``per_client_bytes``: bytes of persistent state per client, by cut.
  """
  init: Callable
  apply: Callable
  eval_models: Callable
  nonfinite_parts: Callable
  per_client_bytes: dict


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A client part and the server part its activations go to, standing for
  ``clients`` (every client of the cut when they hold one model).
  ``one_network``: the state's models are one whole network split at their
  cuts (Averaging after an aggregation), so its full path is evaluated once."""
  cut: int
  clients: tuple
  client: PartState
  server: PartState
  one_network: bool


# -- compiled programs shared by the runs of one process ---------------------------
# A round's compiled programs read the network's class count, the cut, the
# execution mode and the config fields of ``config.PROGRAM_FIELDS``. Runs in
# one process whose configs agree on them (tests, sweeps, a run built twice)
# share their programs; everything else (seed, learning rate and schedule,
# rounds, the fleet, the data; momentum, weight decay and exit-loss weight as
# ``Cohort.hparams``) reaches the programs as inputs. Programs are built from
# :func:`program_config`, which holds these fields only, so a program that
# reads a field not listed fails at once instead of being shared wrongly.
PROGRAM_FIELDS = config_lib.PROGRAM_FIELDS
PROGRAM_CACHE_SIZE = 64
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def clear_program_cache() -> None:
  """Forget every cached program (the next run compiles afresh)."""
  _PROGRAMS.clear()


def program_config(cfg: Config) -> types.SimpleNamespace:
  """The fields of ``cfg`` that compiled programs may read (:data:`PROGRAM_FIELDS`)."""
  return types.SimpleNamespace(**{f: getattr(cfg, f) for f in PROGRAM_FIELDS})


def cached_program(key: tuple, make: Callable):
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


@dataclasses.dataclass
class Context:
  """What both strategies are built from: config, network, optimiser, fleet,
  the train set on the device, the execution (mode, clients per chunk, the
  client mesh) and one client runner per cut. ``objective``: a client
  objective of the user's (:func:`hsee_jax.strategies.exit_objective`'s
  signature) in place of the paper's; ``variant``: the run's variants
  chained (:class:`hsee_jax.variants.Variant`; None: the paper's method),
  whose hooks the strategies read and never name."""
  cfg: Config
  net: models.SplitNetwork
  tx: optax.GradientTransformation
  fleet: Fleet
  train_set: TrainSet
  image_shape: tuple
  mode: str = ""
  chunk: int = 1
  runners: dict = dataclasses.field(default_factory=dict)
  mesh: engine.ClientMesh | None = None
  program_key: tuple = ()   # what the compiled programs depend on (cached_program)
  objective: Callable | None = None
  link: link_lib.Link | None = None  # what the server parts receive (Config.link; None: as computed)
  variant: Any = None                # the run's variants chained (hsee_jax.variants.Variant)

  def hook(self, name: str):
    """The variant's hook ``name``, or None."""
    return getattr(self.variant, name) if self.variant is not None else None

  grouping = property(lambda self: self.hook("grouping"),
                      doc="Which leaves a client keeps (parts.local_leaves), or None.")
  evaluated = property(lambda self: self.hook("evaluated"),
                       doc="The transform of an evaluated network, or None.")
  hparams = property(lambda self: self.variant.hparams if self.variant is not None else (),
                     doc="The variants' own per-step hyperparameters, ((name, value), ...).")

  def exit_cuts(self, cut: int) -> tuple:
    """The cuts below ``cut`` where a client at ``cut`` also trains an exit
    head (the variant's ``exits``), else none."""
    exits = self.hook("exits")
    return tuple(exits(cut, tuple(sorted(self.fleet.groups)))) if exits is not None else ()

  def __post_init__(self):
    cfg = self.cfg
    for hook, what in (("grouping", "keeps leaves per client (grouping)"),
                       ("evaluated", "transforms the evaluated networks (evaluated)")):
      if self.hook(hook) is not None and cfg.strategy != "averaging":
        raise ConfigError(f"variants: {self.variant.name} {what}; that needs "
                          f"strategy=averaging (Sequential's server part is one shared model)")
    self.mode = engine.resolve_mode(cfg.mode, cfg.strategy, cfg.shard_clients,
                                    precision_lib.resolve(cfg.precision), cfg.batch_size)
    self.chunk = engine.resolve_chunk(cfg.client_chunk)
    self.link = None if cfg.link == "none" else link_lib.Link(cfg.link, cfg.link_topk)
    self.program_key = (self.net.num_classes,) + tuple(getattr(cfg, f) for f in PROGRAM_FIELDS)
    view = program_config(cfg)
    objective = self.objective or exit_objective()
    if self.hook("penalty") is not None:
      objective = _plus(objective, self.hook("penalty"))
    names = HPARAMS + tuple(h for h, _ in self.hparams)
    self.runners = {
        cut: cached_program(self.runner_key(cut),
                            lambda cut=cut: engine.ClientRunner(split_update(
                                self.net, cut, objective=objective, exit_cuts=self.exit_cuts(cut),
                                preprocess=preprocessing(view.augment, view.augment_pad),
                                optimizer=view.optimizer, nesterov=view.nesterov,
                                server_grad_to_client=view.server_grad_to_client,
                                link=self.link, step_penalty=self.hook("step_penalty"),
                                hparams=names), self.mode))
        for cut in self.fleet.groups}
    if cfg.shard_clients:
      if cfg.strategy != "averaging" or self.mode not in ("vmap", "unrolled"):
        raise ConfigError("shard_clients: needs strategy=averaging and mode=vmap or unrolled")
      self.mesh = engine.ClientMesh(jax.devices())

  def runner_key(self, cut: int) -> tuple:
    """What the client runner of ``cut`` (and a program built on it) depends on."""
    return ("runner", self.program_key, cut, self.mode, self.exit_cuts(cut), self.objective,
            self.variant)

  def eval_sample(self, cut: int) -> np.ndarray:
    """The clients of ``cut`` evaluated where clients differ: ``eval_clients``
    of them, seeded and fixed for the run (0 = all)."""
    ids = self.fleet.groups[cut]
    n = self.cfg.eval_clients
    if not n or n >= len(ids):
      return ids
    return np.sort(np.random.default_rng([self.cfg.seed, 17, cut]).choice(ids, n, replace=False))

  def per_client_bytes(self, init: Callable) -> dict:
    """Bytes of persistent per-client state of one client, by cut, from the
    shapes of ``init``'s state (worked out once per program and fleet shape)."""
    groups = self.fleet.groups
    def make():
      shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
      return {cut: precision_lib.tree_bytes(shapes.clients[group_key(cut)]) // len(ids) for cut, ids in groups.items()}
    return cached_program(("per_client_bytes", self.cfg.strategy, self.program_key,
                           self.image_shape, tuple((c, len(ids)) for c, ids in groups.items())),
                          make)


def _plus(objective: Callable, penalty: Callable) -> Callable:
  """The client objective with a term added (a variant's ``penalty``)."""
  def total(exits, final, labels, hp):
    return objective(exits, final, labels, hp) + penalty(exits, final, labels, hp)
  return total


def step_inputs(cohort: Cohort, positions) -> tuple:
  """The per-step inputs of :func:`split_update` (indices, hparams) for the
  clients at ``positions`` of ``cohort`` (leading client axis), or for one
  client (an int position), as host arrays. With ``cohort.active``
  (participation=partial) each step's hparams end with whether the client
  does it (its last column)."""
  one = isinstance(positions, (int, np.integer))
  lead = () if one else (len(positions),)
  hparams = np.broadcast_to(cohort.hparams, lead + cohort.hparams.shape)
  if cohort.active is not None:
    hparams = np.concatenate([hparams, cohort.active[positions][..., None].astype(np.float32)], -1)
  return cohort.indices[positions], hparams

