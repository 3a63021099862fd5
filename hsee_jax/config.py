"""Run configuration: one frozen dataclass of plain data, in sections.

:class:`Config` is composed of :data:`SECTIONS` (data, network, fleet,
optimiser, strategy, variants, speeds and link, evaluation, run), each a
dataclass of its fields with the check of what they may be; a config is
flat (``cfg.lr``) and every field is checked, section by section, before
any work starts; every error is one line that names the field. Configs in
``configs/*.py`` define ``get_config() -> Config``; the CLI applies ``--set
key=value`` overrides with :func:`override`, which parses each value
against the field's type.
"""
from __future__ import annotations

import ast
import contextvars
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import sys
import typing
from pathlib import Path

DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "synthetic")
STRATEGIES = ("averaging", "sequential")
MODES = ("auto", "loop", "vmap", "unrolled", "debug")
PARTICIPATION = ("all", "deadline", "partial")
LINKS = ("none", "bfloat16", "int8", "int8_channel", "topk")  # link.KINDS


class ConfigError(ValueError):
  """A config that cannot run; the message is one line naming the field."""


# Bounds that keep every simulated figure finite (seconds, bytes, speeds).
MAX_OVERCOMMIT = 100.0
MAX_SPEED_SPREAD = 3.0        # lognormal sigma: a client 1e-8 .. 1e8 times the median at most
MAX_DEADLINE_S = 1e12
SPEED_RANGE = {"client_flops_per_s": ("FLOP/s", 1e18), "server_flops_per_s": ("FLOP/s", 1e18),
               "client_link_bytes_per_s": ("bytes/s", 1e15), "link_bytes_per_s": ("bytes/s", 1e15)}

# A saved config (a run's config.json, a sweep's plan) is read without the
# rule of EFFECTS: a run trained before the rule existed still resumes and
# evaluates (the fields it refuses changed nothing in that run).
_LENIENT = contextvars.ContextVar("hsee_config_lenient", default=False)


# Each field declares what it is to compilation (``role``), once, on the field:
# *program* fields are read by the compiled programs (runs agreeing on them
# share their programs: ``strategies.cached_program``); *input* fields reach
# the programs as data or not at all (a sweep batches runs that differ only in
# them); every other field is a *shape* field (the data, the fleet, the layout
# of the work), which the runs of a batch share. *Run-only* fields, a separate
# matter, do not change a run's results.
def program(default):
  """A field the compiled programs read."""
  return dataclasses.field(default=default, metadata={"role": "program"})


def input_field(default):
  """A field that reaches the compiled programs as data, or not at all."""
  return dataclasses.field(default=default, metadata={"role": "input"})


def run_only(default, role: str = "input"):
  """A field that does not change a run's results (what is evaluated or saved
  when, how the work is laid out): a checkpoint resumes under another value.
  ``role``: what it is to compilation (``input`` or ``shape``)."""
  return dataclasses.field(default=default, metadata={"role": role, "changes_results": False})


# The config in sections: each a frozen dataclass of its fields with a
# ``check(cfg)`` of what they may be (given the whole config: a field may
# depend on another section's), composed into one flat :class:`Config`
# (``cfg.lr``, ``--set lr=0.1``), the sections in the order below.
SECTIONS: list = []


def section(cls):
  """A section of :class:`Config`: its fields and its ``check``."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  SECTIONS.append(cls)
  return cls


@section
class Data:
  """Where the images come from, how much of them, how they are split and augmented."""
  dataset: str = "cifar10"
  data_dir: str = input_field("")  # "" -> $HSEE_DATA_DIR, then <repo>/../shared/data
  train_subset: int = input_field(0)  # 0 = whole train set; else a seeded random subset
  test_subset: int = input_field(0)  # 0 = whole test set
  synthetic_shape: tuple = (32, 32, 10, 512, 256)  # H, W, classes, train, test
  partition: str = input_field("iid")  # iid | dirichlet
  dirichlet_alpha: float = input_field(0.5)
  augment: bool = program(True)  # random crop of the padded image + horizontal flip, on device
  augment_pad: float = program(0.125)  # crop padding as a share of the image side (4 px at 32, 12 at 96)
  label_mode: str = "fine"  # cifar100: fine (100 classes) | coarse (20 superclasses)

  @staticmethod
  def check(cfg) -> None:
    _one_of("dataset", cfg.dataset, DATASETS)
    _one_of("partition", cfg.partition, ("iid", "dirichlet"))
    _one_of("label_mode", cfg.label_mode, ("fine", "coarse"))
    if not 0 <= cfg.augment_pad < 1:
      raise ConfigError(f"augment_pad: a share of the image side in [0, 1), got {cfg.augment_pad}")
    if cfg.dirichlet_alpha <= 0:
      raise ConfigError(f"dirichlet_alpha: must be > 0, got {cfg.dirichlet_alpha}")
    for name in ("train_subset", "test_subset"):
      if getattr(cfg, name) < 0:
        raise ConfigError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if len(cfg.synthetic_shape) != 5 or any(
        not isinstance(v, int) or v < 1 for v in cfg.synthetic_shape):
      raise ConfigError("synthetic_shape: (height, width, classes, n_train, n_test), positive ints")


@section
class Network:
  """The split network: which, how wide, its exit heads, its compute dtype."""
  model: str = program("resnet18")  # resnet18 (the paper's) | vgg16_bn | mobilenet_v2 (models.NETWORKS)
  width: float = program(1.0)  # channel multiplier; 1.0 = the published network
  exit_head_kind: str = program("linear")  # linear | conv  ([choice] pool+linear, or conv-BN-ReLU first)
  precision: str = program("auto")  # float32 | bfloat16 | auto (bfloat16 on GPU/TPU, float32 on CPU);
                                # compute dtype, parameters stay float32 (hsee_jax/precision.py)

  @staticmethod
  def check(cfg) -> None:
    from hsee_jax import models  # flax: loaded once a config is made, not for `hsee --help`
    from hsee_jax import precision as precision_lib
    _one_of("model", cfg.model, tuple(models.NETWORKS))
    _one_of("exit_head_kind", cfg.exit_head_kind, ("linear", "conv"))
    _one_of("precision", cfg.precision, precision_lib.PRECISIONS)
    if not 0 < cfg.width <= 4:
      raise ConfigError(f"width: must be in (0, 4], got {cfg.width}")


@section
class Fleet:
  """Which clients exist, where each one cuts, who takes part in a round.

  The cuts (resnet18: l in 1..8, PAPER.md; each model's allowed cuts:
  ``models.NETWORKS[model].allowed_cuts()``), one of: ``cuts``, one cut
  layer per client (the default); ``cut_tiers``, device tiers ((cut, share
  of the fleet), ...) over ``num_clients`` clients, assigned by a seeded
  draw; ``budget_tiers``, tiers of ((flops_per_step, memory_bytes), share)
  whose cut is the deepest that fits; ``client_budgets``, one budget per
  client (experiments/reproduce.py, costs.choose_cuts; 0 = no limit). The
  participation defaults are the method as the paper runs it: every client
  every round (fleet.py; docs/usage.md, "Device speeds, deadlines and the link").
  """
  cuts: tuple = (3, 5, 7)
  num_clients: int = 0  # 0 -> len(cuts) (or len(client_budgets)); needed with tiers
  cut_tiers: tuple = ()
  budget_tiers: tuple = ()
  client_budgets: tuple = ()
  clients_per_round: int = -1  # the cohort C sampled each round; -1 = every client
  availability: float = 1.0  # probability that a client is online in a round (seeded)
  participation: str = "all"  # all | deadline (FedScale's over-commitment) | partial (FedProx)
  deadline_s: float = 0.0  # simulated seconds a client has per round (deadline, partial)
  overcommit: float = 1.3  # deadline: clients sampled per cohort place; the first to finish kept
  deadline_by_tier: bool = False  # deadline: each tier (cut) keeps its share of the cohort, the
                             # first of that tier to finish, so the slowest tier is not the one
                             # dropped (a round lasts until its kept clients of every tier finish)

  @staticmethod
  def check(cfg) -> None:
    _one_of("participation", cfg.participation, PARTICIPATION)
    if not 0 < cfg.availability <= 1:
      raise ConfigError(f"availability: a probability in (0, 1], got {cfg.availability}")
    if not 0 <= cfg.deadline_s <= MAX_DEADLINE_S:
      raise ConfigError(f"deadline_s: simulated seconds in [0, {MAX_DEADLINE_S:g}], got "
                        f"{cfg.deadline_s}")
    if cfg.participation != "all" and cfg.strategy == "sequential":
      raise ConfigError(f"participation: {cfg.participation} is for strategy=averaging; "
                        f"Sequential's clients take turns on the one server, and no round "
                        f"deadline is modelled for it")
    if cfg.participation != "all" and cfg.deadline_s <= 0:
      raise ConfigError(f"deadline_s: participation={cfg.participation} needs a deadline in "
                        f"simulated seconds > 0, got {cfg.deadline_s}")
    if not 1 <= cfg.overcommit <= MAX_OVERCOMMIT:
      raise ConfigError(f"overcommit: clients sampled per cohort place, in [1, {MAX_OVERCOMMIT:g}], "
                        f"got {cfg.overcommit}")
    if not cfg.cuts:
      raise ConfigError("cuts: need at least one client (one cut layer per client)")
    for c in cfg.cuts:
      cfg._check_cut("cuts", c)
    cfg._check_fleet()


@section
class Optimiser:
  """Rounds, local steps and the optimiser of every part."""
  rounds: int = input_field(10)
  local_steps: int = 0  # 0 -> about one pass over an average partition
  batch_size: int = 32  # per client and step
  optimizer: str = program("sgd")  # sgd | adam
  lr: float = input_field(0.05)
  momentum: float = input_field(0.9)
  nesterov: bool = program(False)
  weight_decay: float = input_field(5e-4)
  schedule: str = input_field("cosine")  # cosine | step | constant
  step_milestones: tuple = input_field((0.5, 0.75))  # fractions of training, for schedule=step
  step_gamma: float = input_field(0.1)

  @staticmethod
  def check(cfg) -> None:
    _one_of("optimizer", cfg.optimizer, ("sgd", "adam"))
    _one_of("schedule", cfg.schedule, ("cosine", "step", "constant"))
    for name in ("rounds", "batch_size"):
      if getattr(cfg, name) < 1:
        raise ConfigError(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.local_steps < 0:
      raise ConfigError(f"local_steps: must be >= 0, got {cfg.local_steps}")
    if cfg.lr <= 0:
      raise ConfigError(f"lr: must be > 0, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
      raise ConfigError(f"momentum: must be in [0, 1), got {cfg.momentum}")
    if cfg.step_gamma <= 0:
      raise ConfigError(f"step_gamma: the factor the learning rate is multiplied by at each "
                        f"milestone, must be > 0, got {cfg.step_gamma}")
    if cfg.weight_decay < 0:
      raise ConfigError(f"weight_decay: must be >= 0, got {cfg.weight_decay}")
    if any(not 0.0 < m < 1.0 for m in cfg.step_milestones):
      raise ConfigError("step_milestones: fractions of training in (0, 1)")


@section
class Strategy:
  """How the parts train and meet: Averaging, Sequential or one's own."""
  strategy: str = "averaging"  # averaging | sequential | your own: FILE.py[:NAME] or module:NAME
                               # (a function Context -> Algorithm; `--strategy SPEC`)
  aggregate_every: int = program(1)  # rounds between cross-layer aggregations
  client_state: str = program("keep")  # keep | reset: client optimiser state across rounds
                                # (reset = the federated-learning convention)
  client_aggregation: str = "none"  # sequential only: none | cross_layer
  server_grad_to_client: bool = program(False)  # True = classical split learning baseline
  exit_loss_weight: float = input_field(1.0)  # 0 with server_grad_to_client: the uncut network's
                                        # training (central / classical baselines)

  @staticmethod
  def check(cfg) -> None:
    if cfg.strategy not in STRATEGIES and not _is_spec(cfg.strategy):
      raise ConfigError(f"strategy: unknown value {cfg.strategy!r}; expected one of "
                        f"{', '.join(STRATEGIES)}, or your own: FILE.py[:NAME] or module:NAME "
                        f"(a function Context -> Algorithm)")
    _one_of("client_aggregation", cfg.client_aggregation, ("none", "cross_layer"))
    _one_of("client_state", cfg.client_state, ("keep", "reset"))
    if cfg.aggregate_every < 1:
      raise ConfigError(f"aggregate_every: must be >= 1, got {cfg.aggregate_every}")
    if cfg.exit_loss_weight < 0:
      raise ConfigError(f"exit_loss_weight: must be >= 0, got {cfg.exit_loss_weight}")
    if cfg.exit_loss_weight == 0 and not cfg.server_grad_to_client:
      raise ConfigError("exit_loss_weight: 0 leaves the client part untrained unless "
                        "server_grad_to_client=True")


@section
class Variants:
  """Changes to the method ([choice]): the built-in variants' fields (each
  read by its module under hsee_jax/variants/) and variants of one's own."""
  variants: tuple = program(())  # your own method: variant specs (FILE.py[:NAME] or module:NAME,
                                # hsee_jax/variants), loaded by every command; `--variant SPEC`
  client_exits: str = program("own")  # own | every: DepthFL (ICLR 2023) "every": a client also
                                # trains an exit head at each of the fleet's cuts below its own
                                # (client loss: the mean over its exits); averaging only
  exit_weights: str = program("equal")  # equal | rising: how a client's exits weigh in its loss
                                # (client_exits=every): DepthFL's mean, or the k-th of n exits
                                # (shallowest first) weighing k / (1 + ... + n)
  distill: str = program("none")  # none | deepest | server: self-distillation of the client's
                                # exits (KL at distill_temperature, Hinton's T^2 scaling): from its
                                # own (deepest) exit (ScaleFL / DepthFL; needs client_exits=every),
                                # or from the server's logits sent back as soft labels
  distill_weight: float = input_field(1.0)  # weight of the distillation term
  distill_temperature: float = program(1.0)  # DepthFL's 1; ScaleFL's 3
  distill_start: int = input_field(1)  # distillation from this round on (1 = the first)
  prox_mu: float = program(0.0)  # FedProx (Li et al., MLSys 2020): each local step adds
                                # prox_mu / 2 * ||w - w0||^2, w0 the round's starting weights
  static_bn: bool = False  # HeteroFL's static batch norm: the evaluated networks' batch
                                # statistics recomputed over the training data; averaging only
  tier_local_top: bool = program(False)  # InclusiveFL (KDD 2022): each tier's deepest client
                                # unit averaged within its tier only; averaging only
  aggregate_sides: str = program("together")  # together | apart (after SplitFed): a unit held
                                # in client parts and in server parts keeps two copies, each
                                # averaged over its side's holders only; averaging only

  @staticmethod
  def check(cfg) -> None:
    _one_of("aggregate_sides", cfg.aggregate_sides, ("together", "apart"))
    _one_of("client_exits", cfg.client_exits, ("own", "every"))
    _one_of("distill", cfg.distill, ("none", "deepest", "server"))
    _one_of("exit_weights", cfg.exit_weights, ("equal", "rising"))
    if not (cfg.prox_mu >= 0):
      raise ConfigError(f"prox_mu: must be >= 0, got {cfg.prox_mu}")
    if cfg.distill_weight < 0:
      raise ConfigError(f"distill_weight: must be >= 0, got {cfg.distill_weight}")
    if cfg.distill_temperature <= 0:
      raise ConfigError(f"distill_temperature: must be > 0, got {cfg.distill_temperature}")
    if cfg.distill_start < 1:
      raise ConfigError(f"distill_start: the first round with distillation, >= 1, got "
                        f"{cfg.distill_start}")
    if any(not isinstance(v, str) or not v.strip() for v in cfg.variants):
      raise ConfigError(f"variants: each entry is a spec, FILE.py[:NAME] or module:NAME, got "
                        f"{cfg.variants!r}")


@section
class SpeedsAndLink:
  """The devices' speeds and the link (costs.py, the simulated clock): each
  client's speeds drawn around its tier's, and what the link carries."""
  client_flops_per_s: tuple = input_field(())  # one per client, or one per tier; () = 1e10 each
  server_flops_per_s: float = input_field(1e13)
  link_bytes_per_s: float = input_field(1.25e6)  # 10 Mbit/s
  client_link_bytes_per_s: tuple = ()  # one per client, or one per tier; () = link_bytes_per_s each
  speed_spread: float = 0.0  # lognormal sigma of each client's FLOP/s and bandwidth around the
                             # given figure (its median); 0 = the figure itself
  link: str = program("none")  # what the server part receives: none (the activations as
                               # computed) | bfloat16 | int8 | int8_channel | topk
  link_topk: float = program(0.1)  # topk: the share of each image's activation values sent

  @staticmethod
  def check(cfg) -> None:
    _one_of("link", cfg.link, LINKS)
    if not 0 <= cfg.speed_spread <= MAX_SPEED_SPREAD:
      raise ConfigError(f"speed_spread: a lognormal sigma in [0, {MAX_SPEED_SPREAD:g}] (beyond it "
                        f"speeds reach 0 and infinity), got {cfg.speed_spread}")
    if not 0 < cfg.link_topk <= 1:
      raise ConfigError(f"link_topk: a share of the values in (0, 1], got {cfg.link_topk}")
    if cfg.link != "none" and cfg.server_grad_to_client:
      raise ConfigError("link: compression models what the client sends; with "
                        "server_grad_to_client the gradient comes back uncompressed: use link=none")
    for name in ("server_flops_per_s", "link_bytes_per_s"):
      if not 1 <= getattr(cfg, name) <= SPEED_RANGE[name][1]:
        raise ConfigError(f"{name}: must be in [1, {SPEED_RANGE[name][1]:g}] "
                          f"({SPEED_RANGE[name][0]}), got {getattr(cfg, name)}")
    n_tiers = len(cfg.cut_tiers or cfg.budget_tiers)
    for name in ("client_flops_per_s", "client_link_bytes_per_s"):
      given = getattr(cfg, name)
      unit, most = SPEED_RANGE[name]
      if given and len(given) not in (cfg.fleet_size, n_tiers):
        want = f"{cfg.fleet_size} clients" + (f" or {n_tiers} tiers" if n_tiers else "")
        raise ConfigError(f"{name}: one entry per client or tier ({want}), got {len(given)}")
      if given and n_tiers and cfg.fleet_size == n_tiers:
        raise ConfigError(f"{name}: {len(given)} entries for {cfg.fleet_size} clients in "
                          f"{n_tiers} tiers is ambiguous (per client or per tier?); give the "
                          f"clients' cuts with cuts=(...) instead of tiers")
      if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 1 <= v <= most
             for v in given):
        raise ConfigError(f"{name}: each entry is a number in [1, {most:g}] ({unit})")


@section
class Evaluation:
  """What is evaluated, how often, with which early-exit thresholds."""
  eval_every: int = run_only(1, "input")
  eval_batch_size: int = run_only(500, "input")
  eval_clients: int = run_only(0, "input")  # where clients differ: clients evaluated per cut (seeded); 0 = all
  exit_thresholds: tuple = run_only((0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), "input")

  @staticmethod
  def check(cfg) -> None:
    for name in ("eval_every", "eval_batch_size"):
      if getattr(cfg, name) < 1:
        raise ConfigError(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_clients < 0:
      raise ConfigError(f"eval_clients: must be >= 0, got {cfg.eval_clients}")
    if any(not 0.0 <= t <= 1.0 for t in cfg.exit_thresholds):
      raise ConfigError("exit_thresholds: each threshold is a normalised entropy in [0, 1]")


@section
class Run:
  """The run as the machine does it: its name and seed, how the work is laid
  out (none of which changes results but the seed), checkpoints and writers."""
  name: str = run_only("default", "input")
  seed: int = input_field(0)
  mode: str = run_only("auto", "shape")  # auto | loop | vmap | unrolled | debug
  shard_clients: bool = run_only(False, "shape")  # lay the client axis over jax.devices() (averaging; vmap/unrolled)
  client_chunk: int = run_only(0, "shape")  # clients per compiled call (vmap/unrolled); 0 = auto per backend
  checkpoint_every: int = run_only(5, "input")  # rounds; 0 = only at the end
  keep_checkpoints: int = run_only(3, "input")
  tensorboard: bool = run_only(False, "input")  # also write metrics to <run>/tensorboard (writers.py)

  @staticmethod
  def check(cfg) -> None:
    _one_of("mode", cfg.mode, MODES)
    if cfg.tensorboard and importlib.util.find_spec("tensorboardX") is None:
      raise ConfigError("tensorboard: True needs tensorboardX: pip install -e '.[tensorboard]'")
    if cfg.keep_checkpoints < 1:
      raise ConfigError(f"keep_checkpoints: must be >= 1, got {cfg.keep_checkpoints}")
    for name in ("checkpoint_every", "client_chunk"):
      if getattr(cfg, name) < 0:
        raise ConfigError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**31:
      raise ConfigError(f"seed: must be an int in 0..{2**31 - 1}, got {cfg.seed}")
    if cfg.strategy == "sequential" and cfg.mode in ("vmap", "unrolled"):
      raise ConfigError(f"mode: {cfg.mode} stacks clients, but sequential trains them one at a "
                        f"time with the shared server; use mode=loop, debug or auto")


class _Config:
  """Every knob of a run, in :data:`SECTIONS` (data, network, fleet,
  optimiser, strategy, variants, speeds and link, evaluation, run), each
  section checking its own fields; ``[choice]`` fields are PAPER.md's
  project choices."""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      _check_type(f.name, getattr(self, f.name), _field_types()[f.name])
      bad = _nonfinite(getattr(self, f.name))
      if bad is not None:
        raise ConfigError(f"{f.name}: every number must be finite, got {bad}")
    for sec in SECTIONS:
      sec.check(self)
    if not _LENIENT.get():
      self.check_effects()

  def _check_fleet(self):
    if self.num_clients < 0:
      raise ConfigError(f"num_clients: must be >= 0, got {self.num_clients}")
    if sum(bool(x) for x in (self.cut_tiers, self.budget_tiers, self.client_budgets)) > 1:
      raise ConfigError("cut_tiers, budget_tiers and client_budgets each define the fleet's "
                        "cuts; give only one")
    if self.cut_tiers or self.budget_tiers:
      name = "cut_tiers" if self.cut_tiers else "budget_tiers"
      tiers = self.cut_tiers or self.budget_tiers
      if self.num_clients < 1:
        raise ConfigError(f"num_clients: {name} needs the fleet size (num_clients >= 1)")
      for t in tiers:
        if not isinstance(t, tuple) or len(t) != 2:
          raise ConfigError(f"{name}: each tier is ({'cut' if self.cut_tiers else 'budget'}, "
                            f"share of the fleet), got {t!r}")
        if self.cut_tiers:
          self._check_cut(name, t[0])
        else:
          _check_budget(name, t[0])
        if not isinstance(t[1], (int, float)) or isinstance(t[1], bool) or not 0 < t[1] <= 1:
          raise ConfigError(f"{name}: share {t[1]!r} of tier {t[0]!r} must be in (0, 1]")
      total = sum(t[1] for t in tiers)
      if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"{name}: shares must sum to 1, got {total:g}")
      if self.cut_tiers and len({t[0] for t in tiers}) != len(tiers):
        raise ConfigError("cut_tiers: each cut at most once (merge the shares of equal cuts)")
    else:
      given = len(self.client_budgets) or len(self.cuts)
      what = "client_budgets" if self.client_budgets else "cuts"
      if self.num_clients not in (0, given):
        raise ConfigError(f"num_clients: {self.num_clients}, but {what} gives {given} clients; "
                          f"give one entry per client, or use cut_tiers for a fleet")
    for b in self.client_budgets:
      _check_budget("client_budgets", b)
    n, c = self.fleet_size, self.clients_per_round
    if c == 0 or c < -1:
      raise ConfigError(f"clients_per_round: must be >= 1 (or -1 for every client), got {c}")
    if c > n:
      raise ConfigError(f"clients_per_round: {c} is more than the fleet's {n} clients")
    if self.samples_clients and self.aggregate_every > 1:
      raise ConfigError("aggregate_every > 1 with clients_per_round < num_clients is not "
                        "defined (sampled clients would train models that the next "
                        "aggregation may not see); use aggregate_every=1 or every client")
    if self.samples_clients and self.client_aggregation != "none":
      raise ConfigError("client_aggregation=cross_layer with clients_per_round < num_clients is "
                        "not defined; use every client or client_aggregation=none")

  def static_cuts(self) -> tuple | None:
    """The fleet's distinct cuts where the config names them (``cuts``,
    ``cut_tiers``); None where budgets decide them."""
    if self.budget_tiers or self.client_budgets:
      return None
    return tuple(sorted({t[0] for t in self.cut_tiers} if self.cut_tiers else set(self.cuts)))

  def check_effects(self, cuts=None) -> None:
    """One rule for every field that needs another (:data:`EFFECTS`): set
    away from its default, it must have an effect in this config, else a
    one-line error naming what it needs. ``cuts``: the fleet's distinct cuts
    (default: those the config names; budgets decide them when the fleet is
    built, which checks again)."""
    idle = self.idle_fields(cuts)
    if idle:
      name, needs = idle[0]
      raise ConfigError(f"{name}: {_jsonable(getattr(self, name))!r} has no effect in this "
                        f"config: it needs {needs}")

  def idle_fields(self, cuts=None) -> list[tuple[str, str]]:
    """(field, what it needs) of every field away from its default that has
    no effect in this config (:data:`EFFECTS`), in the table's order."""
    cuts = self.static_cuts() if cuts is None else tuple(cuts)
    defaults, idle = _defaults(), []
    for name, needs, has_effect in EFFECTS:
      if getattr(self, name) == defaults[name]:
        continue
      if has_effect(self, cuts) is False and name not in (n for n, _ in idle):
        idle.append((name, needs))
    return idle

  def _check_cut(self, name, c):
    try:
      from hsee_jax import models
      models.NETWORKS[self.model].check_cut(c)
    except ValueError as e:
      raise ConfigError(f"{name}: {e}") from None

  @property
  def fleet_size(self) -> int:
    """N: the number of clients in the fleet."""
    if self.num_clients:
      return self.num_clients
    return len(self.client_budgets) or len(self.cuts)

  @property
  def cohort_size(self) -> int:
    """C: clients per round."""
    return self.fleet_size if self.clients_per_round == -1 else self.clients_per_round

  def aggregates_after(self, rnd: int) -> bool:
    """Whether round ``rnd`` (0-based) ends with a cross-layer aggregation
    (Averaging's, and a strategy of one's own is priced as Averaging;
    Sequential's of the client parts with ``client_aggregation``)."""
    due = (rnd + 1) % self.aggregate_every == 0
    return due and (self.strategy != "sequential" or self.client_aggregation != "none")

  @property
  def samples_clients(self) -> bool:
    """Whether the clients that train change from round to round (sampling,
    clients offline, a deadline)."""
    return (self.cohort_size < self.fleet_size or self.availability < 1
            or self.participation != "all")

  def method_changes(self) -> dict[str, list[str]]:
    """What this config changes of the paper's method, as ``field=value``
    words per group of :data:`METHOD_FIELDS` (the fields away from their
    defaults); empty groups left out (the run's header names them)."""
    defaults = _defaults()
    out = {}
    for group, names in METHOD_FIELDS.items():
      words = [f"{n}={_word(getattr(self, n))}" for n in names if getattr(self, n) != defaults[n]]
      if words:
        out[group] = words
    return out

  def to_dict(self) -> dict:
    """Every field as a JSON value (``from_dict`` reads it back)."""
    return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _compose():
  """:class:`Config`: one frozen dataclass of every section's fields, in order."""
  specs = []
  for sec in SECTIONS:
    hints = typing.get_type_hints(sec)
    for f in dataclasses.fields(sec):
      specs.append((f.name, hints[f.name], dataclasses.field(default=f.default,
                                                             metadata=f.metadata)))
  cls = dataclasses.make_dataclass("Config", specs, bases=(_Config,), frozen=True,
                                   namespace={"__doc__": _Config.__doc__})
  cls.__module__, cls.__qualname__ = __name__, "Config"
  return cls


Config = _compose()


def section_of(name: str):
  """The section that declares field ``name``."""
  return next(sec for sec in SECTIONS if name in {f.name for f in dataclasses.fields(sec)})


# The fields that change the method a run trains, by group (a run's header
# names those away from their defaults: Config.method_changes).
METHOD_FIELDS = {
    "training": ("client_state", "aggregate_every", "client_aggregation",
                 "server_grad_to_client", "exit_loss_weight"),
    "variants": ("variants", "client_exits", "exit_weights", "distill", "distill_weight",
                 "distill_temperature", "distill_start", "prox_mu", "static_bn", "tier_local_top",
                 "aggregate_sides"),
    "fleet": ("participation", "deadline_s", "overcommit", "deadline_by_tier", "availability",
              "speed_spread"),
    "link": ("link", "link_topk"),
}


def _word(v) -> str:
  return ",".join(map(_word, v)) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


def _several_cuts(cfg, cuts) -> bool | None:
  return None if cuts is None else len(cuts) > 1


_AVERAGING = "strategy=averaging"
_SEVERAL = "a fleet of several cuts (with one cut every client holds the same units)"
_DISTILL = "distill=deepest or distill=server"
# The rule for companion fields (Config.check_effects): a field set away from
# its default needs what the row says, else it has no effect. Each row:
# (field, what it needs, whether the config gives it an effect: (cfg, the
# fleet's distinct cuts or None) -> bool, or None for "not known yet").
EFFECTS = (
    ("deadline_s", "participation=deadline or participation=partial",
     lambda c, _: c.participation != "all"),
    ("overcommit", "participation=deadline", lambda c, _: c.participation == "deadline"),
    ("deadline_by_tier", "participation=deadline", lambda c, _: c.participation == "deadline"),
    ("link_topk", "link=topk", lambda c, _: c.link == "topk"),
    ("link_bytes_per_s", "client_link_bytes_per_s=() (it gives every client's bandwidth)",
     lambda c, _: not c.client_link_bytes_per_s),
    ("cuts", "no cut_tiers, budget_tiers or client_budgets (they give the fleet's cuts)",
     lambda c, _: not (c.cut_tiers or c.budget_tiers or c.client_budgets)),
    ("dirichlet_alpha", "partition=dirichlet", lambda c, _: c.partition == "dirichlet"),
    ("synthetic_shape", "dataset=synthetic", lambda c, _: c.dataset == "synthetic"),
    ("label_mode", "dataset=cifar100 (coarse labels exist only there)",
     lambda c, _: c.dataset == "cifar100"),
    ("augment_pad", "augment=True", lambda c, _: c.augment),
    ("momentum", "optimizer=sgd (adam keeps its own moments)", lambda c, _: c.optimizer == "sgd"),
    ("nesterov", "optimizer=sgd", lambda c, _: c.optimizer == "sgd"),
    ("step_milestones", "schedule=step", lambda c, _: c.schedule == "step"),
    ("step_gamma", "schedule=step", lambda c, _: c.schedule == "step"),
    ("aggregate_every", "strategy=averaging or client_aggregation=cross_layer (else nothing "
     "is aggregated)", lambda c, _: c.strategy != "sequential" or c.client_aggregation != "none"),
    ("client_aggregation", "strategy=sequential (averaging always aggregates across layers)",
     lambda c, _: c.strategy == "sequential"),
    ("tier_local_top", _AVERAGING, lambda c, _: c.strategy == "averaging"),
    ("tier_local_top", _SEVERAL, _several_cuts),
    ("aggregate_sides", _AVERAGING, lambda c, _: c.strategy == "averaging"),
    ("aggregate_sides", _SEVERAL, _several_cuts),
    ("client_exits", _AVERAGING, lambda c, _: c.strategy == "averaging"),
    ("client_exits", _SEVERAL + ": no cut below another to hold an exit at", _several_cuts),
    ("exit_weights", "client_exits=every (else a client has one exit)",
     lambda c, _: c.client_exits == "every"),
    ("distill", "client_exits=every for deepest (it distils a client's shallower exits from its "
     "own)", lambda c, _: c.distill != "deepest" or c.client_exits == "every"),
    ("distill", "distill_start <= rounds (it never starts)", lambda c, _: c.distill_start <= c.rounds),
    ("distill_weight", _DISTILL, lambda c, _: c.distill != "none"),
    ("distill_temperature", _DISTILL, lambda c, _: c.distill != "none"),
    ("distill_start", _DISTILL, lambda c, _: c.distill != "none"),
    ("prox_mu", _AVERAGING, lambda c, _: c.strategy == "averaging"),
    ("static_bn", _AVERAGING, lambda c, _: c.strategy == "averaging"),
)


@functools.lru_cache(maxsize=None)
def _default_values() -> tuple:
  return tuple((f.name, f.default) for f in dataclasses.fields(Config))


def _defaults() -> dict:
  return dict(_default_values())


def did_you_mean(name: str, known) -> str:
  """``; did you mean X?`` for the closest of ``known``, or nothing."""
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f"; did you mean {close[0]}?" if close else ""


def at_point(base: Config, changes: dict) -> tuple[Config, list[str]]:
  """``base`` with ``changes`` (a sweep's grid point), and the fields of
  ``base`` that the point leaves without effect, set back to their defaults
  (they change nothing there; a sweep over ``participation`` with
  ``deadline_s`` in its base, say). A swept field without effect stays an
  error. Returns the config and the fields set back."""
  defaults, reset = _defaults(), {}
  for _ in range(len(EFFECTS)):
    token = _LENIENT.set(True)
    try:
      loose = dataclasses.replace(base, **changes, **reset)
    finally:
      _LENIENT.reset(token)
    idle = [n for n, _ in loose.idle_fields() if n not in changes and n not in reset]
    if not idle:
      break
    reset.update({n: defaults[n] for n in idle})
  return dataclasses.replace(base, **changes, **reset), sorted(reset)


def run_fields() -> frozenset:
  """The fields marked :func:`run_only`."""
  return frozenset(f.name for f in dataclasses.fields(Config)
                   if not f.metadata.get("changes_results", True))


def field_role(name: str) -> str:
  """``program``, ``input`` or ``shape``: what field ``name`` is to compilation."""
  return {f.name: f.metadata.get("role", "shape") for f in dataclasses.fields(Config)}[name]


# The program and input fields, in field order (derived from the declarations).
PROGRAM_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if field_role(f.name) == "program")
INPUT_FIELDS = tuple(f.name for f in dataclasses.fields(Config) if field_role(f.name) == "input")


# What a saved config that predates a field ran with, where that is not the
# field's default (runs before ``precision`` computed in float32).
PREDATED = {"precision": "float32"}
# Former names of fields, still read from saved configs and ``--set``.
RENAMED = {"exit_head": "exit_head_kind"}


def _current_names(d: dict) -> dict:
  """``d`` with former field names (:data:`RENAMED`) replaced by the current ones."""
  return {RENAMED.get(k, k): v for k, v in d.items()}


def field_defaults() -> dict:
  """Every field's value in a saved config that predates it: its default, as
  ``Config.to_dict`` writes values, or what runs before it used (``PREDATED``)."""
  return {**{f.name: _jsonable(f.default) for f in dataclasses.fields(Config)}, **PREDATED}


def _jsonable(v):
  return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


def _nonfinite(v):
  """The first infinite or NaN float in ``v`` (tuples searched), else None."""
  if isinstance(v, float) and not math.isfinite(v):
    return v
  if isinstance(v, tuple):
    return next((b for b in map(_nonfinite, v) if b is not None), None)
  return None


def _check_budget(name, b):
  if (not isinstance(b, tuple) or len(b) != 2
      or any(not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0 for x in b)):
    raise ConfigError(f"{name}: each budget is (flops_per_step, memory_bytes), "
                      f"numbers >= 0 (0 = no limit), got {b!r}")


def _field_types():
  return typing.get_type_hints(Config)


def _is_spec(text: str) -> bool:
  """A strategy of one's own: ``FILE.py[:NAME]`` or ``module:NAME``."""
  return ":" in text or text.endswith(".py")


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ConfigError(f"{name}: unknown value {value!r}; expected one of {', '.join(allowed)}")


def _check_type(name, value, typ):
  if typ is float and isinstance(value, int) and not isinstance(value, bool):
    return  # ints are fine where floats are expected
  if typ is tuple:
    if not isinstance(value, tuple):
      raise ConfigError(f"{name}: expected a tuple, got {type(value).__name__} {value!r}")
    return
  if typ is int and isinstance(value, bool):
    raise ConfigError(f"{name}: expected int, got bool {value!r}")
  if not isinstance(value, typ):
    raise ConfigError(f"{name}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def from_dict(d: dict) -> Config:
  """Config from a saved dict (``config.json``, a sweep plan); unknown keys are
  errors, a missing field takes what runs before it used (``PREDATED``)."""
  known = {f.name for f in dataclasses.fields(Config)}
  d = _current_names(d)
  unknown = sorted(set(d) - known)
  if unknown:
    raise ConfigError(f"unknown config key(s): {', '.join(unknown)}"
                      + (did_you_mean(unknown[0], known) if len(unknown) == 1 else ""))
  token = _LENIENT.set(True)
  try:
    return Config(**{k: _tuples(v) for k, v in {**PREDATED, **d}.items()})
  finally:
    _LENIENT.reset(token)


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def override(cfg: Config, assignments: list[str]) -> Config:
  """Apply ``key=value`` strings; values are Python literals or bare strings."""
  types = _field_types()
  changes = {}
  for a in assignments:
    if "=" not in a:
      raise ConfigError(f"--set {a!r}: expected key=value")
    key, raw = a.split("=", 1)
    key = RENAMED.get(key.strip(), key.strip())
    if key not in types:
      raise ConfigError(f"unknown config key {key!r} in --set {a!r}{did_you_mean(key, types)}")
    typ = types[key]
    if typ is str:
      value = raw
    else:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        raise ConfigError(f"--set {a!r}: {raw!r} is not a valid {typ.__name__}") from None
      if typ is tuple and isinstance(value, (list, int, float)):
        value = _tuples(value) if isinstance(value, list) else (value,)
    changes[key] = value
  return dataclasses.replace(cfg, **changes) if changes else cfg


def load(path: str | Path, assignments: list[str] | None = None) -> Config:
  """Load ``get_config()`` from a config file (or the config of a run: its
  ``config.json``) and apply overrides."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  if path.suffix == ".json":
    return override(read_json_config(path), assignments or [])
  module = run_user_file(path, f"hsee_config_{path.stem}", f"config file {path}")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config()")
  try:
    cfg = module.get_config()
  except ConfigError as e:
    raise ConfigError(f"config file {path}: {e}") from None
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"config file {path}: get_config() raised {type(e).__name__}: {e}") from None
  if not isinstance(cfg, Config):
    raise ConfigError(f"{path}: get_config() must return hsee_jax.config.Config")
  return override(cfg, assignments or [])


def run_user_file(path: Path, module_name: str, what: str):
  """The module a user's Python file defines, executed (its folder importable
  meanwhile); an error in it is one :class:`ConfigError` line beginning
  with ``what``."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(Path(path).parent))
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{what}: syntax error at line {e.lineno}: {e.msg}") from None
  except ConfigError as e:
    raise ConfigError(f"{what}: {e}") from None
  except Exception as e:  # noqa: BLE001  (the file is the user's code)
    raise ConfigError(f"{what}: {type(e).__name__}: {_first(e)}") from None
  finally:
    sys.path.remove(str(Path(path).parent))
  return module


def _first(e: BaseException) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else ""


def read_json_config(path: Path) -> Config:
  """A config saved as JSON (a run's ``config.json``)."""
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is damaged: not JSON ({e.msg} at line {e.lineno})") from None
  except OSError as e:
    raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path} is damaged: not a JSON object")
  return from_dict(data)
