"""A training run: :func:`build` makes everything from a Config (a
:class:`Simulation`), :func:`run_rounds` is the loop over rounds, and
:func:`train` runs a config into a run directory (:class:`rundir.RunDir`)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from hsee_jax import config as config_lib
from hsee_jax import data as data_lib
from hsee_jax import distributed
from hsee_jax import engine, evaluation, models, optim, rundir, stopping, strategies
from hsee_jax import fleet as fleet_lib
from hsee_jax import precision as precision_lib
from hsee_jax import writers as writers_lib
from hsee_jax.checkpoint import CheckpointError, meta_for
from hsee_jax.config import Config
from hsee_jax.rundir import RunError, restore_state
from hsee_jax.strategies import METRIC_NAMES


@dataclasses.dataclass
class Simulation:
  """Everything a run is built from: the fleet, the strategy as an
  :class:`strategies.Algorithm`, its context (network, optimiser, compiled
  runners), the local steps and the learning-rate schedule."""
  cfg: Config
  fleet: fleet_lib.Fleet
  ctx: strategies.Context
  algorithm: strategies.Algorithm
  local_steps: int
  schedule: Callable

  @property
  def runners(self) -> dict:
    return self.ctx.runners

  @property
  def net(self):
    return self.ctx.net

  def init_state(self, key):
    """The strategy's initial state (``Algorithm.init``)."""
    return self.algorithm.init(key)

  def abstract_state(self):
    """Shapes and dtypes of the state (for restoring checkpoints)."""
    return jax.eval_shape(self.algorithm.init, jax.random.PRNGKey(0))

  def cohort(self, rnd: int, base_key) -> fleet_lib.Cohort:
    """Round ``rnd``'s sampled clients with their step inputs (seeded by ``base_key``)."""
    return fleet_lib.make_cohort(self.fleet, self.cfg, rnd, self.local_steps, self.schedule,
                                 base_key)

  def evaluate(self, state, dataset: data_lib.Dataset) -> dict:
    """Test metrics of ``state`` (:func:`evaluation.evaluate` of the
    algorithm's models, with the config's thresholds and batch size)."""
    return evaluation.evaluate(self.net, self.fleet, self.algorithm.eval_models(state), dataset,
                               self.cfg.exit_thresholds, self.cfg.eval_batch_size)

  def run_round(self, state, rnd: int, base_key):
    """One round: sample the cohort, train it; (state, metrics [C, 4] as numpy, cohort)."""
    cohort = self.cohort(rnd, base_key)
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
      (:func:`strategies.exit_objective`; ``examples/exit_objective.py``).
  Returns:
    ``(dataset, sim)``: the :class:`Simulation`, whose ``init_state(key)``
    and ``run_round(state, rnd, key)`` train the run round by round.
  Raises:
    RunError / ConfigError: one line, for a fleet or config that cannot run.
  """
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
                           dataset.image_shape, objective=objective)
  algorithm = strategies.STRATEGIES[cfg.strategy](ctx)
  sim = Simulation(cfg, fleet, ctx, algorithm, steps, schedule)
  check_fits(sim, dataset)
  return dataset, sim


def available_memory_bytes() -> int | None:
  """Memory the run's arrays can still take: on the CPU the host's
  ``MemAvailable`` (``/proc/meminfo``), on an accelerator the first device's
  limit less what is in use; None where neither is known."""
  if jax.default_backend() == "cpu":
    try:
      for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
      return None
    return None
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def memory_need(sim: Simulation, image_shape: tuple) -> tuple[int, int]:
  """(persistent state, one compiled call's activations) in bytes, the lower
  bound :func:`check_fits` holds against the memory left: the state as
  stored (float32), and every unit's output for each image of a batch of
  every client trained in one call, in the compute dtype (``precision``:
  bfloat16 counts half of float32)."""
  cfg = sim.cfg
  state = precision_lib.tree_bytes(sim.abstract_state())
  values = sum(math.prod(sim.net.unit_output_shape(k, image_shape))
               for k in range(1, sim.net.num_units + 1))
  parallel = sim.ctx.chunk if sim.ctx.mode in ("vmap", "unrolled") else 1
  itemsize = precision_lib.itemsize(precision_lib.resolve(cfg.precision))
  return state, itemsize * values * cfg.batch_size * min(parallel, cfg.cohort_size)


def check_fits(sim: Simulation, dataset: data_lib.Dataset) -> None:
  """Refuse, in one line and before any state is made, work that cannot run:
  a batch larger than the whole training set (a client whose data is smaller
  than a batch repeats its images within the batch; docs/usage.md), or the
  lower bound of :func:`memory_need` beyond :func:`available_memory_bytes`."""
  cfg = sim.cfg
  n_train = len(dataset.train_labels)
  if cfg.batch_size > n_train:
    raise RunError(f"batch_size: {cfg.batch_size} is more than the {n_train} training images "
                   f"of {dataset.name}; a batch draws from one client's data")
  available = available_memory_bytes()
  if available is None:
    return
  state, step = memory_need(sim, dataset.image_shape)
  if state + step > available:
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    raise RunError(f"this run needs at least {gib(state + step)} (persistent state "
                   f"{gib(state)} for {cfg.fleet_size} clients, activations of one step "
                   f"{gib(step)}), more than the {gib(available)} available on "
                   f"{jax.default_backend()}; lower batch_size, client_chunk or the number of "
                   f"clients, or use client_state=reset")


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

  def last(self) -> str:
    last = self.ckpt.latest_step()
    return "none" if last is None else f"after round {last}"

  def _failed(self, rounds_done: int, e: CheckpointError) -> RoundError:
    return RoundError(f"round {rounds_done}: {e}; the checkpoint before it is intact: "
                      f"{self.last()}", rounds_done - 1, local=True)

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
            images: int) -> dict:
  """A round's record (``metrics.jsonl``): the fleet's mean train metrics and each client's."""
  return {"round": rnd, "seconds": seconds, "images_per_s": images / seconds,
          "train": dict(zip(METRIC_NAMES, map(float, metrics.mean(0)))),
          "train_per_client": [{"client": int(i), "cut": int(c),
                                **dict(zip(METRIC_NAMES, map(float, m)))}
                               for i, c, m in zip(cohort.ids, cohort.cuts, metrics)]}


def _last(checkpoints: RoundCheckpoints | None) -> str:
  return checkpoints.last() if checkpoints is not None else "none"


def run_rounds(sim: Simulation, state, start: int, train_key, *,
               evaluate: Callable | None = None, checkpoints: RoundCheckpoints | None = None,
               writers: list = (), stop: Callable[[], int | None] | None = None):
  """Rounds ``start + 1 .. cfg.rounds`` of a run: the only place that fixes
  the order of a round.

  Each round: ``stop()`` is asked first (a signal number ends the loop
  before the round); the cohort is sampled, the algorithm's ``apply``
  trains it, the metrics and the trained parts are checked for NaN / Inf;
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
  images = cfg.cohort_size * sim.local_steps * cfg.batch_size
  for rnd in range(start, cfg.rounds):
    signum = stop() if stop is not None else None
    if signum is not None:
      return state, rnd, signum
    t0 = time.time()
    cohort = sim.cohort(rnd, train_key)
    state, metrics = sim.algorithm.apply(state, cohort)
    jax.block_until_ready(state)
    seconds = time.time() - t0
    metrics = np.asarray(metrics)
    try:
      _check_finite(sim, state, metrics, rnd, cohort)
    except RunError as e:
      raise RoundError(f"{e}; last good checkpoint: {_last(checkpoints)}", rnd) from None
    record = _record(rnd, metrics, cohort, seconds, images)
    done = rnd + 1
    saving = checkpoints is not None and checkpoints.due(done)
    if saving:
      checkpoints.save(done, state)
    if evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.rounds):
      record["test"] = evaluate(state)
    for w in writers:
      try:
        w.write_round(record)
      except RunError as e:
        raise RoundError(f"{e}; newest checkpoint: {_last(checkpoints)}", rnd, local=True) from None
    if saving:
      checkpoints.finish(done)
  return state, cfg.rounds, None


def train(cfg: Config, out_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
          log: Callable[[str], None] = print, dataset: data_lib.Dataset | None = None) -> dict:
  """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its newest
  intact checkpoint (with ``rounds`` raised, extend a finished run).

  The directory is locked while this process trains in it. SIGINT / SIGTERM
  stop the run after the round in flight, with a checkpoint
  (:class:`stopping.Stopped`); a second signal abandons the round
  (:class:`stopping.Abandoned`). A round that cannot finish (non-finite
  values, a failed save) is recorded in ``metrics.jsonl`` and raised as a
  one-line :class:`RunError`. With several processes, process 0 writes and
  reports; the others compute (but every process says when a signal
  reached it). Returns the summary (``summary.json``)."""
  writer = distributed.is_writer()
  signal_log, log = log, distributed.writer_log(log)
  run = rundir.RunDir(out_dir, writer)
  with contextlib.ExitStack() as stack:
    stack.enter_context(run.locked(log))
    stop = stack.enter_context(stopping.StopSignals(signal_log))
    writers = writers_lib.for_config(cfg, run.path, log) if writer else []  # they check first
    run.prepare(cfg, overwrite, resume)
    distributed.barrier("run-directories-ready")
    t_start = time.time()
    dataset, sim = build(cfg, dataset, log)
    run.write_fleet(sim.fleet.describe())
    ckpt = stack.enter_context(run.checkpointer(cfg.keep_checkpoints))
    init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    state, start, records = None, 0, []
    if resume:
      resumed = run.resume(sim, cfg, ckpt, (init_key, train_key), log)
      if resumed.finished:
        return _finished_summary(run)
      state, start, train_key, records = (resumed.state, resumed.start, resumed.train_key,
                                          resumed.records)
    else:
      state = sim.init_state(init_key)
    _log_header(sim, dataset, state, log)
    metrics_file = stack.enter_context(contextlib.closing(run.metrics_file(records)))
    if resume:
      distributed.barrier("resume-written")
      ckpt.reload()  # the checkpoints process 0 set aside are gone from every process's view
    for w in writers:
      stack.callback(w.close)
      w.begin(cfg, records)
    writers = [metrics_file] + writers
    checkpoints = RoundCheckpoints(ckpt, cfg, train_key)
    try:
      state, done, signum = run_rounds(
          sim, state, start, train_key, checkpoints=checkpoints, writers=writers,
          evaluate=lambda s: sim.evaluate(s, dataset),
          stop=lambda: distributed.agreed_stop(stop.requested))
    except RoundError as e:
      distributed.yield_to_watcher()
      with contextlib.suppress(RunError):
        metrics_file.write({"round": e.round, "event": "stopped", "error": str(e)})
      log(f"[hsee] {e}")
      if e.local and distributed.several_processes():
        distributed.fail(f"{run.path}: {e}", 2)
      raise RunError(str(e)) from None
    except stopping.Abandoned as e:
      e.out = run.path
      raise
    if signum is not None:
      _stop(checkpoints, state, done, signum, metrics_file)
      raise stopping.Stopped(signum, done, run.path)
    summary = _summary(sim, start if resume else None, metrics_file.last_test, t_start)
    run.write_summary(summary)   # while the directory is still locked
  for c in (summary["test"] or {}).get("cuts", []):
    log(f"[hsee] {evaluation.format_cut(c)}")
  log(f"[hsee] done in {summary['wall_seconds']:.1f}s; results in {run.path}")
  return summary


def _stop(checkpoints: RoundCheckpoints, state, done: int, signum: int, metrics_file) -> None:
  """A stop signal: save what was trained (if not saved yet) and say so in ``metrics.jsonl``."""
  if checkpoints.ckpt.latest_step() != done:
    try:
      checkpoints.ckpt.save(done, state, meta_for(checkpoints.cfg, done, checkpoints.train_key))
      checkpoints.ckpt.finish(done)
    except CheckpointError as e:
      raise RunError(f"stopping after round {done}: {e}") from None
  metrics_file.write({"round": done, "event": "stopped",
                      "error": f"{signal.Signals(signum).name} after round {done}"})


def _finished_summary(run: rundir.RunDir) -> dict:
  try:
    return run.read_summary()
  except (OSError, json.JSONDecodeError) as e:
    raise RunError(f"{run.summary_path} is damaged ({e}); the run's checkpoints are "
                   f"intact: hsee eval --run {run.path}") from None


def _log_header(sim: Simulation, dataset, state, log) -> None:
  cfg, fleet = sim.cfg, sim.fleet
  tiers = ", ".join(f"{len(ids)} at cut {c}" for c, ids in fleet.groups.items())
  log(f"[hsee] {cfg.name}: {cfg.strategy}, {fleet.num_clients} clients ({tiers}), "
      f"{cfg.cohort_size} per round, {dataset.name} {len(dataset.train_labels)} train / "
      f"{len(dataset.test_labels)} test, width {cfg.width}, {sim.local_steps} local steps x "
      f"batch {cfg.batch_size}, mode {sim.ctx.mode} (chunks of {sim.ctx.chunk}), "
      f"precision {cfg.precision} ({precision_lib.resolve(cfg.precision)}), "
      f"backend {jax.default_backend()}")
  log(f"[hsee] persistent state: {precision_lib.tree_bytes(state) / 2**20:.1f} MiB; per client "
      + ", ".join(f"{b / 2**10:.1f} KiB at cut {c}"
                  for c, b in sim.algorithm.per_client_bytes.items()))


def _summary(sim: Simulation, resumed_from: int | None, test: dict | None, t_start: float) -> dict:
  cfg, fleet = sim.cfg, sim.fleet
  return {
      "config": cfg.to_dict(), "rounds": cfg.rounds, "local_steps": sim.local_steps,
      "backend": jax.default_backend(), "precision": precision_lib.resolve(cfg.precision),
      "resumed_from_round": resumed_from,
      "num_clients": fleet.num_clients, "clients_per_round": cfg.cohort_size,
      "cuts": fleet.cuts.tolist(),
      "clients_per_cut": {str(c): len(ids) for c, ids in fleet.groups.items()},
      "per_client_state_bytes": {str(c): b for c, b in sim.algorithm.per_client_bytes.items()},
      "test": test, "wall_seconds": time.time() - t_start, "processes": jax.process_count()}


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
    state, meta = restore_state(sim, ckpt, cfg, step, log)
  result = {"run": str(run), "checkpoint_round": meta["round"],
            "test": sim.evaluate(state, dataset)}
  path = run / f"eval_round{meta['round']}.json"
  log(f"[hsee] {run}: checkpoint after round {meta['round']}")
  log(evaluation.format_table(result["test"]))   # first: a write that fails loses nothing shown
  stopping.check_early()   # a stop signal that was swallowed where it came: nothing is written
  try:
    rundir.write_atomic(path, json.dumps(result, indent=2))
  except RunError as e:
    raise RunError(f"{e}; the metrics above were not saved") from None
  log(f"[hsee] written {path}")
  return result
