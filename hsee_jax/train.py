"""A training run: :func:`build` makes everything from a Config (a
:class:`Simulation`), :func:`run_rounds` is the loop over rounds, and
:func:`train` runs a config into a run directory (:class:`rundir.RunDir`)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from hsee_jax import data as data_lib
from hsee_jax import distributed
from hsee_jax import costs, evaluation, models, optim, preflight, rundir, stopping, strategies
from hsee_jax import fleet as fleet_lib
from hsee_jax import precision as precision_lib
from hsee_jax import variants as variants_lib
from hsee_jax import writers as writers_lib
from hsee_jax.checkpoint import CheckpointError, config_differences, key_from_json, meta_for
from hsee_jax.config import Config, ConfigError, field_defaults
from hsee_jax.rundir import RunError, restore_state
from hsee_jax.strategies import METRIC_NAMES


@dataclasses.dataclass
class Simulation:
  """Everything a run is built from: its :class:`strategies.Context` (the
  config, fleet, network, optimiser, execution and compiled runners, each
  held there once), the strategy as an :class:`strategies.Algorithm`, the
  local steps and the learning-rate schedule."""
  ctx: strategies.Context
  algorithm: strategies.Algorithm
  local_steps: int
  schedule: Callable

  cfg = property(lambda self: self.ctx.cfg, doc="The run's config.")
  fleet = property(lambda self: self.ctx.fleet, doc="The run's clients.")
  net = property(lambda self: self.ctx.net, doc="The split network.")
  runners = property(lambda self: self.ctx.runners, doc="One client runner per cut.")

  def init_state(self, key):
    """The strategy's initial state (``Algorithm.init``)."""
    return self.algorithm.init(key)

  def abstract_state(self):
    """Shapes and dtypes of the state (for restoring checkpoints)."""
    return jax.eval_shape(self.algorithm.init, jax.random.PRNGKey(0))

  @functools.cached_property
  def clock(self) -> costs.Clock:
    """Each client's simulated seconds and bytes (:func:`costs.run_clock`)
    in the run's last round."""
    return self.clock_at(self.cfg.rounds - 1)

  @functools.cached_property
  def _clocks(self) -> dict:
    return {}

  def clock_at(self, rnd: int) -> costs.Clock:
    """The clock of round ``rnd``: the same every round, but where a
    variant's ``downlink`` changes with the round (soft labels from a
    start round on); one clock per distinct downlink."""
    v = self.ctx.variant
    down = v.downlink(self.cfg, self.net.num_classes, rnd) if v and v.downlink else 0
    if down not in self._clocks:
      self._clocks[down] = costs.run_clock(self.cfg, self.net, self.ctx.image_shape, self.fleet,
                                           rnd, v)
    return self._clocks[down]

  def cohort(self, rnd: int, base_key) -> fleet_lib.Cohort:
    """Round ``rnd``'s clients (``cfg.participation``) with their step
    inputs (seeded by ``base_key``) and the round's simulated time."""
    return fleet_lib.make_cohort(self.fleet, self.cfg, rnd, self.local_steps, self.schedule,
                                 base_key, self.clock_at(rnd), self.ctx.hparams)

  def evaluate(self, state, dataset: data_lib.Dataset) -> dict:
    """Test metrics of ``state`` (:func:`evaluation.evaluate` of the
    algorithm's models, with the config's thresholds and batch size)."""
    return evaluation.evaluate(self.net, self.fleet, self.algorithm.eval_models(state), dataset,
                               self.cfg.exit_thresholds, self.cfg.eval_batch_size, self.ctx.link)

  def run_round(self, state, rnd: int, base_key):
    """One round, the step :func:`run_rounds` repeats: sample the cohort,
    train it; (state, metrics [C, 4] as numpy, cohort)."""
    cohort = self.cohort(rnd, base_key)
    if not cohort.size:  # nobody online, or nobody in time: the round trains nothing
      return state, np.zeros((0, len(METRIC_NAMES)), np.float32), cohort
    state, metrics = self.algorithm.apply(state, cohort)
    return state, np.asarray(metrics), cohort


def build(cfg: Config, dataset: data_lib.Dataset | None = None,
          log: Callable[[str], None] | None = None, *,
          objective: Callable | None = None) -> tuple[data_lib.Dataset, Simulation]:
  """Dataset, fleet, network, optimiser and strategy for a config.

  Args:
    cfg: the run's config.
    dataset: the loaded dataset (default: :func:`data.load_dataset` of ``cfg``).
    log: where the fleet's summary lines go (None: nowhere).
    objective: a client objective of your own in place of the config's
      (:func:`strategies.exit_objective`; ``examples/exit_objective.py``);
      the config's ``variants`` (:mod:`hsee_jax.variants`) are loaded and
      checked first, before any data is loaded.
  Returns:
    ``(dataset, sim)``: the :class:`Simulation`, whose ``init_state(key)``
    and ``run_round(state, rnd, key)`` train the run round by round.
  Raises:
    RunError / ConfigError: one line, for a fleet or config that cannot run.
  """
  variant = check_variants(cfg)
  _strategy(cfg)   # a strategy of one's own that does not load: one line, before any data
  if variant is not None and variant.objective is not None:
    if objective is not None:
      raise RunError(f"objective: the variant {variant.name} replaces the client objective "
                     f"already; give one of the two")
    objective = variant.objective
  dataset = dataset if dataset is not None else data_lib.load_dataset(cfg)
  try:
    fleet = fleet_lib.build_fleet(cfg, dataset, log)
  except fleet_lib.FleetError as e:
    raise RunError(str(e)) from None
  steps = cfg.local_steps or max(1, math.ceil(float(np.mean(fleet.data_sizes)) / cfg.batch_size))
  net = models.for_config(cfg, dataset.num_classes)
  tx = optim.make_optimizer(cfg)
  schedule = optim.make_schedule(cfg, cfg.rounds * steps)
  ctx = strategies.Context(cfg, net, tx, fleet, strategies.put_train_set(dataset),
                           dataset.image_shape, objective=objective, variant=variant)
  algorithm = _strategy(cfg)(ctx)
  if not isinstance(algorithm, strategies.Algorithm):
    raise RunError(f"strategy {cfg.strategy}: returned a {type(algorithm).__name__}, not an "
                   f"hsee_jax.Algorithm (init, apply, eval_models, nonfinite_parts, "
                   f"per_client_bytes)")
  sim = Simulation(ctx, algorithm, steps, schedule)
  preflight.check_fits(sim, dataset)
  return dataset, sim


def _strategy(cfg: Config) -> Callable:
  """The strategy a config names: Averaging, Sequential, or one of one's
  own (:func:`hsee_jax.variants.load_strategy`)."""
  return strategies.STRATEGIES.get(cfg.strategy) or variants_lib.load_strategy(cfg.strategy)


def check_variants(cfg: Config):
  """The config's variants (:func:`hsee_jax.variants.for_config`: the
  built-in ones its fields turn on, then its ``variants`` specs loaded and
  traced once against abstract shapes) chained, None for the paper's
  method: a spec that does not load, a hook with a wrong signature or a
  loss that is not one number is a one-line error here, before any data is
  loaded."""
  return variants_lib.for_config(cfg, 10,
                                 leaf_paths=lambda: strategies.parts.leaf_paths(models.for_config(cfg, 10),
                                                                       (32, 32, 3)))


class RoundError(RunError):
  """A round that cannot finish: the run stops here. ``local``: a save or a
  write, which may have struck this process alone (non-finite values are
  the same on every process)."""

  def __init__(self, message: str, rnd: int, local: bool = False):
    super().__init__(message)
    self.round, self.local = rnd, local


class RoundCheckpoints:
  """The checkpoints of a run's rounds: every ``checkpoint_every`` rounds and
  after the last; a failed save is a :class:`RoundError` saying which
  checkpoint is intact."""

  def __init__(self, ckpt, cfg: Config, train_key):
    self.ckpt, self.cfg, self.train_key = ckpt, cfg, train_key

  def due(self, rounds_done: int) -> bool:
    every = self.cfg.checkpoint_every
    return rounds_done == self.cfg.rounds or bool(every and rounds_done % every == 0)

  def last(self, upto: int | None = None) -> str:
    """The newest checkpoint that restores (checked: ``Checkpointer.newest_restorable``;
    ``upto``: of those after rounds <= it), in words."""
    return _round_words(self.ckpt.newest_restorable(upto))

  def _failed(self, rounds_done: int, e: CheckpointError) -> RoundError:
    return RoundError(f"round {rounds_done}: {e}; {RESTORES}: {self.last()}", rounds_done - 1,
                      local=True)

  def save(self, rounds_done: int, state) -> None:
    """Start writing the state after ``rounds_done`` rounds (in the background)."""
    try:
      self.ckpt.save(rounds_done, state, meta_for(self.cfg, rounds_done, self.train_key))
    except CheckpointError as e:
      raise self._failed(rounds_done, e) from None

  def finish(self, rounds_done: int) -> None:
    """Wait for the save; then the older checkpoints beyond ``keep`` go."""
    try:
      self.ckpt.finish(rounds_done)
    except CheckpointError as e:
      raise self._failed(rounds_done, e) from None

  def save_at_stop(self, rounds_done: int, state) -> None:
    """A stop signal after ``rounds_done`` rounds: their state saved and
    finished, unless that checkpoint exists already."""
    if self.ckpt.latest_step() == rounds_done:
      return
    try:
      self.ckpt.save(rounds_done, state, meta_for(self.cfg, rounds_done, self.train_key))
      self.ckpt.finish(rounds_done)
    except CheckpointError as e:
      raise RunError(f"stopping after round {rounds_done}: {e}") from None


def _check_finite(sim: Simulation, state, metrics: np.ndarray, rnd: int,
                  cohort: fleet_lib.Cohort) -> None:
  bad = ~np.isfinite(metrics)
  if bad.any():
    pos, col = map(int, np.argwhere(bad)[0])
    raise RunError(f"round {rnd + 1}: non-finite {METRIC_NAMES[col]} "
                   f"({metrics[pos, col]}) on client {cohort.ids[pos]} (cut {cohort.cuts[pos]})")
  parts = sim.algorithm.nonfinite_parts(state, cohort.ids)
  if parts:
    raise RunError(f"round {rnd + 1}: non-finite parameters in {', '.join(parts)}")


def _record(rnd: int, metrics: np.ndarray, cohort: fleet_lib.Cohort, seconds: float,
            images: int, fleet: fleet_lib.Fleet) -> dict:
  """A round's record (``metrics.jsonl``): the round on the simulated clock
  and the link, per cut of ``fleet`` the sampled clients that missed the
  deadline (``dropped_per_cut``) and those in time but not needed
  (``unused_per_cut``, over-commitment), the fleet's mean train metrics and
  each client's."""
  per_cut = lambda ids: {str(c): int(np.sum(fleet.cuts[ids] == c)) for c in fleet.groups}
  return {"round": rnd, "seconds": seconds, "images_per_s": images / max(seconds, 1e-9),
          "sim_seconds": cohort.sim_seconds, "bytes_sent": cohort.bytes_sent,
          "dropped_per_cut": per_cut(cohort.dropped), "unused_per_cut": per_cut(cohort.unused),
          "train": dict(zip(METRIC_NAMES, map(float, metrics.mean(0)))) if len(metrics) else {},
          "train_per_client": [{"client": int(i), "cut": int(c),
                                **dict(zip(METRIC_NAMES, map(float, m)))}
                               for i, c, m in zip(cohort.ids, cohort.cuts, metrics)]}


# How a message names the checkpoint a run can go on from.
RESTORES = "the newest checkpoint that restores"


def _round_words(step: int | None) -> str:
  return "none" if step is None else f"after round {step}"


def _last(checkpoints: RoundCheckpoints | None, upto: int | None = None) -> str:
  return checkpoints.last(upto) if checkpoints is not None else "none"


def run_rounds(sim: Simulation, state, start: int, train_key, *,
               evaluate: Callable | None = None, checkpoints: RoundCheckpoints | None = None,
               writers: list = (), stop: Callable[[], int | None] | None = None):
  """Rounds ``start + 1 .. cfg.rounds`` of a run: the only place that fixes
  the order of a round.

  Each round: ``stop()`` is asked first (a signal number ends the loop
  before the round); :meth:`Simulation.run_round` samples the cohort and
  the algorithm's ``apply`` trains it; the metrics and the trained parts are checked for NaN / Inf;
  then the checkpoint save starts (when due), ``evaluate(state) -> test
  metrics`` runs (every ``eval_every`` rounds and after the last; the save
  writes meanwhile), each writer gets the round's record
  (``write_round``, in order: ``metrics.jsonl`` first), and the save is
  finished. A checkpoint is thus complete before its round's record exists.

  Returns ``(state, rounds done, signal number or None)``. Raises
  :class:`RoundError` for a round that cannot finish (nothing of it
  recorded).
  """
  cfg = sim.cfg
  for rnd in range(start, cfg.rounds):
    signum = stop() if stop is not None else None
    if signum is not None:
      return state, rnd, signum
    t0 = time.time()
    state, metrics, cohort = sim.run_round(state, rnd, train_key)
    jax.block_until_ready(state)
    seconds = time.time() - t0
    try:
      _check_finite(sim, state, metrics, rnd, cohort)
    except RunError as e:
      raise RoundError(f"{e}; last good checkpoint: {_last(checkpoints)}", rnd) from None
    steps = cohort.size * sim.local_steps if cohort.active is None else int(cohort.active.sum())
    record = _record(rnd, metrics, cohort, seconds, steps * cfg.batch_size, sim.fleet)
    done = rnd + 1
    saving = checkpoints is not None and checkpoints.due(done)
    if saving:
      checkpoints.save(done, state)
    if evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.rounds):
      record["test"] = evaluate(state)
    recorded = rnd   # rounds metrics.jsonl holds, which a resume goes on from
    for w in writers:
      try:
        w.write_round(record)
      except RunError as e:
        raise RoundError(f"{e}; {RESTORES}: {_last(checkpoints, recorded)}", rnd,
                         local=True) from None
      recorded = done
    if saving:
      checkpoints.finish(done)
  return state, cfg.rounds, None


def train(cfg: Config, out_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
          log: Callable[[str], None] = print, dataset: data_lib.Dataset | None = None,
          writers: tuple = (), begin_from: tuple | None = None) -> dict:
  """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its newest
  intact checkpoint (with ``rounds`` raised, extend a finished run).

  The directory is locked while this process trains in it. SIGINT / SIGTERM
  stop the run after the round in flight, with a checkpoint
  (:class:`stopping.Stopped`); a second signal abandons the round
  (:class:`stopping.Abandoned`). A round that cannot finish (non-finite
  values, a failed save) is recorded in ``metrics.jsonl`` and raised as a
  one-line :class:`RunError`. With several processes, process 0 writes and
  reports; the others compute (but every process says when a signal
  reached it). ``writers``: more :class:`writers.Writer` s, after the
  run's own (``hsee_jax.tune`` reports each evaluation to Ray Tune with
  one). ``begin_from=(RUN, ROUND)``: a new run that begins from another
  run's state after ``ROUND`` (its newest checkpoint at or before it), its
  records up to there and its training key, with ``cfg``'s fields where they
  differ (Ray Tune's PBT continues a trial from a better one this way).
  Returns the summary (``summary.json``)."""
  if begin_from is not None and resume:
    raise ConfigError("train: give resume or begin_from, not both")
  signal_log, log, extra = log, distributed.writer_log(log), list(writers)
  check_variants(cfg)   # a variant that cannot run: one line before the directory is touched
  run = rundir.RunDir(out_dir, distributed.is_writer())
  with contextlib.ExitStack() as stack:
    stack.enter_context(run.locked(log))
    stop = stack.enter_context(stopping.StopSignals(signal_log))
    writers = (writers_lib.for_config(cfg, run.path, log) + extra if run.writer  # they check first
               else [])
    run.prepare(cfg, overwrite, resume)
    distributed.barrier("run-directories-ready")
    t_start = time.time()
    dataset, sim = build(cfg, dataset, log)
    run.write_fleet(sim.fleet.describe())
    ckpt = stack.enter_context(run.checkpointer(cfg.keep_checkpoints))
    begun = (_begin_from(sim, *begin_from, log) if begin_from is not None
             else _begin(run, sim, ckpt, resume, log))
    if begun is None:
      return _finished_summary(run)
    state, start, train_key, records = begun
    _log_header(sim, dataset, state, log)
    try:
      writers = _open_writers(stack, run, cfg, writers, records, ckpt if resume else None)
    except rundir.WriteError as e:
      raise rundir.WriteError(f"{e}; {RESTORES}: {_round_words(ckpt.newest_restorable())}") from None
    checkpoints = RoundCheckpoints(ckpt, cfg, train_key)
    with _stopping(run, writers, log):
      state, done, signum = run_rounds(
          sim, state, start, train_key, checkpoints=checkpoints, writers=writers,
          evaluate=lambda s: sim.evaluate(s, dataset),
          stop=lambda: distributed.agreed_stop(stop.requested))
    if signum is not None:
      checkpoints.save_at_stop(done, state)
      _event(writers, done, f"{signal.Signals(signum).name} after round {done}")
      raise stopping.Stopped(signum, done, run.path)
    summary = _summary(sim, start if resume or begin_from else None, writers[0], t_start)
    try:
      run.write_summary(summary)   # while the directory is still locked
    except rundir.WriteError as e:
      raise rundir.WriteError(f"{e}; {RESTORES}: {_round_words(ckpt.newest_restorable())} "
                              f"(hsee train --resume {run.path} writes it)") from None
  for c in (summary["test"] or {}).get("cuts", []):
    log(f"[hsee] {evaluation.format_cut(c)}")
  log(f"[hsee] done in {summary['wall_seconds']:.1f}s; results in {run.path}")
  return summary


def _begin(run: rundir.RunDir, sim: Simulation, ckpt, resume: bool, log):
  """(state, first round, training key, records kept) a run begins from: the
  seed's, or its directory's with ``resume``; None for a finished run."""
  init_key, train_key = jax.random.split(jax.random.PRNGKey(sim.cfg.seed))
  if not resume:
    return sim.init_state(init_key), 0, train_key, []
  resumed = run.resume(sim.cfg, ckpt, sim.abstract_state(), log)
  if resumed.finished:
    return None
  if resumed.extended_from is not None:
    log(f"[hsee] extending {run.path} from {resumed.extended_from} to {sim.cfg.rounds} rounds: "
        + optim.extension_note(sim.cfg, sim.schedule, sim.local_steps, resumed.start,
                               resumed.extended_from))
  if resumed.state is None:
    return sim.init_state(init_key), 0, train_key, resumed.records
  return resumed.state, resumed.start, resumed.train_key, resumed.records


def _begin_from(sim: Simulation, source, rnd: int, log):
  """(state, first round, training key, records kept) of a run begun from
  the newest checkpoint of the run at ``source`` at or before round ``rnd``."""
  src = rundir.RunDir(source, writer=False)
  with src.checkpointer(sim.cfg.keep_checkpoints, create=False) as ckpt:
    steps = [s for s in ckpt.steps() if s <= rnd]
    if not steps:
      raise RunError(f"begin from {src.path} after round {rnd}: it has no complete checkpoint "
                     f"at or before that round (it has {ckpt.steps() or 'none'})")
    state, meta = restore_state(sim.abstract_state(), ckpt, sim.cfg, steps[-1], log,
                                allowed=tuple(field_defaults()))
  start = int(meta["round"])
  diff = config_differences(meta["config"], sim.cfg)
  log(f"[hsee] begun from {src.path} after round {start}"
      + (f"; differs in {'; '.join(diff)}" if diff else ""))
  return (state, start, key_from_json(meta["train_key"]),
          [r for r in src.read_records(log) if r["round"] < start])


def _open_writers(stack, run: rundir.RunDir, cfg: Config, writers: list, records: list,
                  resumed_ckpt) -> list:
  """The run's writers begun on the records it keeps: ``metrics.jsonl``
  (:class:`writers.MetricsFile`, rewritten to hold them) first, then
  ``writers``; each closed when ``stack`` ends. After a resume every process
  waits for process 0's rewrite and reloads the checkpoints it set aside."""
  writers = [writers_lib.MetricsFile(run.keep_records(records), records, run.writer)] + writers
  for w in writers:
    stack.callback(w.close)
  if resumed_ckpt is not None:
    distributed.barrier("resume-written")
    resumed_ckpt.reload()  # the checkpoints process 0 set aside are gone from every process's view
  for w in writers:
    w.begin(cfg, records)
  return writers


def _event(writers: list, rnd: int, error: str) -> None:
  """A stop, said by every writer (``metrics.jsonl`` records it)."""
  for w in writers:
    w.write_event({"round": rnd, "event": "stopped", "error": error})


@contextlib.contextmanager
def _stopping(run: rundir.RunDir, writers: list, log):
  """A round that cannot finish, recorded and raised as one line; an
  abandoned round told where its run is."""
  try:
    yield
  except RoundError as e:
    distributed.yield_to_watcher()
    with contextlib.suppress(RunError):
      _event(writers, e.round, str(e))
    log(f"[hsee] {e}")
    error = rundir.WriteError(str(e)) if e.local else RunError(str(e))
    if e.local and distributed.several_processes():
      distributed.fail(f"{run.path}: {e}", error.exit_code)
    raise error from None
  except stopping.Abandoned as e:
    e.out = run.path
    raise


def _finished_summary(run: rundir.RunDir) -> dict:
  try:
    return run.read_summary()
  except (OSError, json.JSONDecodeError) as e:
    raise RunError(f"{run.summary_path} is damaged ({e}); the run's checkpoints are "
                   f"intact: hsee eval --run {run.path}") from None


def _log_header(sim: Simulation, dataset, state, log) -> None:
  cfg, fleet = sim.cfg, sim.fleet
  tiers = ", ".join(f"{len(ids)} at cut {c}" for c, ids in fleet.groups.items())
  clients = f"{fleet.num_clients} client{'s' if fleet.num_clients != 1 else ''}"
  log(f"[hsee] {cfg.name}: {cfg.strategy}, {clients} ({tiers}), "
      f"{cfg.cohort_size} per round, {dataset.name} {len(dataset.train_labels)} train / "
      f"{len(dataset.test_labels)} test, width {cfg.width}, {sim.local_steps} local steps x "
      f"batch {cfg.batch_size}, mode {sim.ctx.mode} (chunks of {sim.ctx.chunk}), "
      f"precision {cfg.precision} ({precision_lib.resolve(cfg.precision)}), "
      f"backend {jax.default_backend()}")
  changes = cfg.method_changes()
  log(f"[hsee] method: {cfg.strategy}" + ("".join(f"; {group} " + ", ".join(words)
                                                 for group, words in changes.items())
                                         if changes else " as the paper trains it (no variant, "
                                         "everyone every round, the activations as computed)"))
  log(f"[hsee] persistent state: {precision_lib.tree_bytes(state) / 2**20:.1f} MiB; per client "
      + ", ".join(f"{b / 2**10:.1f} KiB at cut {c}"
                  for c, b in sim.algorithm.per_client_bytes.items()))


def _summary(sim: Simulation, resumed_from: int | None, metrics: writers_lib.MetricsFile,
             t_start: float) -> dict:
  """``summary.json``: the run's config, fleet, newest test metrics and its
  totals on the simulated clock and the link."""
  cfg, fleet = sim.cfg, sim.fleet
  return {
      "config": cfg.to_dict(), "rounds": cfg.rounds, "local_steps": sim.local_steps,
      "backend": jax.default_backend(), "precision": precision_lib.resolve(cfg.precision),
      "resumed_from_round": resumed_from,
      "num_clients": fleet.num_clients, "clients_per_round": cfg.cohort_size,
      "cuts": fleet.cuts.tolist(),
      "clients_per_cut": {str(c): len(ids) for c, ids in fleet.groups.items()},
      "per_client_state_bytes": {str(c): b for c, b in sim.algorithm.per_client_bytes.items()},
      "test": metrics.last_test, "sim_seconds": metrics.sim_seconds,
      "bytes_sent": metrics.bytes_sent,
      "wall_seconds": time.time() - t_start, "processes": jax.process_count()}


def evaluate_run(run_dir: str | Path, step: int | None = None,
                 log: Callable[[str], None] = print) -> dict:
  """Test metrics of a run's newest (or a named) checkpoint, without training.

  It takes no lock: on a run that another process is training it reads the
  newest complete checkpoint (a checkpoint is complete on disk before its
  round is recorded) and writes ``eval_round<N>.json`` atomically beside
  it, which the training neither reads nor writes."""
  run = Path(run_dir)
  cfg = rundir.load_config(run)
  dataset, sim = build(cfg)
  with rundir.RunDir(run).checkpointer(cfg.keep_checkpoints, create=False) as ckpt:
    state, meta = restore_state(sim.abstract_state(), ckpt, cfg, step, log)
  result = {"run": str(run), "checkpoint_round": meta["round"],
            "test": sim.evaluate(state, dataset)}
  path = rundir.RunDir(run).eval_path(meta["round"])
  log(f"[hsee] {run}: checkpoint after round {meta['round']}")
  log(evaluation.format_table(result["test"]))   # first: a write that fails loses nothing shown
  stopping.check_early()   # a stop signal that was swallowed where it came: nothing is written
  try:
    rundir.write_atomic(path, json.dumps(result, indent=2))
  except RunError as e:
    raise RunError(f"{e}; the metrics above were not saved") from None
  log(f"[hsee] written {path}")
  return result
