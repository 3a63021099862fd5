"""A training run: build everything from a Config, train for cfg.rounds rounds,
evaluate, and write ``config.json``, ``metrics.jsonl`` and ``summary.json``."""
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
from hsee_jax import evaluation, models, optim, rundir, strategies, writers
from hsee_jax import fleet as fleet_lib
from hsee_jax.checkpoint import (CheckpointError, Checkpointer, config_differences,
                                 key_from_json, meta_for)
from hsee_jax.config import Config
from hsee_jax.rundir import RunError
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

  def run_round(self, state, rnd: int, base_key):
    """One round: sample the cohort, train it; (state, metrics [C, 4] as numpy, cohort)."""
    cohort = self.cohort(rnd, base_key)
    state, metrics = self.algorithm.apply(state, cohort)
    return state, np.asarray(metrics), cohort


def build(cfg: Config, dataset: data_lib.Dataset | None = None,
          log: Callable[[str], None] | None = None,
          shared: tuple | None = None) -> tuple[data_lib.Dataset, Simulation]:
  """Dataset, fleet, network, optimiser and strategy for a config.

  Args:
    cfg: the run's config.
    dataset: the loaded dataset (default: :func:`data.load_dataset` of ``cfg``).
    log: where the fleet's summary lines go (None: nowhere).
    shared: ``(strategies.Shared, offset, row)`` holding this run's train set
      among others (runs trained together, :func:`build_runs`).
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
  steps = cfg.local_steps or max(1, math.ceil(float(np.mean(fleet.sizes)) / cfg.batch_size))
  net = models.for_config(cfg, dataset.num_classes)
  tx = optim.make_optimizer(cfg)
  schedule = optim.make_schedule(cfg, cfg.rounds * steps)
  if shared is None:
    data, (offset,), (row,) = strategies.make_shared([dataset])
  else:
    data, offset, row = shared
  ctx = strategies.Context(cfg, net, tx, fleet, data, dataset.image_shape, offset=offset, row=row)
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


def check_fits(sim: Simulation, dataset: data_lib.Dataset) -> None:
  """Refuse, in one line and before any state is made, work that cannot run:
  a batch larger than the whole training set (a client whose data is smaller
  than a batch repeats its images within the batch; docs/usage.md), or a
  persistent state plus one compiled call's activations (a lower bound:
  every unit's output, float32, for each image of a batch of every client
  trained in the call) beyond :func:`available_memory_bytes`."""
  cfg = sim.cfg
  n_train = len(dataset.train_labels)
  if cfg.batch_size > n_train:
    raise RunError(f"batch_size: {cfg.batch_size} is more than the {n_train} training images "
                   f"of {dataset.name}; a batch draws from one client's data")
  available = available_memory_bytes()
  if available is None:
    return
  state = _nbytes(sim.abstract_state())
  per_image = 4 * sum(math.prod(sim.net.unit_output_shape(k, dataset.image_shape))
                      for k in range(1, sim.net.num_units + 1))
  parallel = sim.ctx.chunk if sim.ctx.mode in ("vmap", "unrolled") else 1
  step = per_image * cfg.batch_size * min(parallel, cfg.cohort_size)
  if state + step > available:
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    raise RunError(f"this run needs at least {gib(state + step)} (persistent state "
                   f"{gib(state)} for {cfg.fleet_size} clients, activations of one step "
                   f"{gib(step)}), more than the {gib(available)} available on "
                   f"{jax.default_backend()}; lower batch_size, client_chunk or the number of "
                   f"clients, or use client_state=reset")


def _nbytes(tree) -> int:
  return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def build_runs(cfgs: list[Config], datasets: list | None = None,
               log: Callable[[str], None] | None = None) -> list[tuple[data_lib.Dataset, Simulation]]:
  """:func:`build` for runs trained together: one :class:`strategies.Shared`
  holds all their train sets, so runs of one batch can be stacked."""
  datasets = [d if d is not None else data_lib.load_dataset(c)
              for c, d in zip(cfgs, datasets or [None] * len(cfgs))]
  data, offsets, rows = strategies.make_shared(datasets)
  return [build(c, d, log, (data, o, r)) for c, d, o, r in zip(cfgs, datasets, offsets, rows)]


def _format_metrics(m: dict) -> str:
  return "  ".join(f"{k} {m[k]:.3f}" for k in METRIC_NAMES)


def _format_round(rec: dict, rounds: int) -> str:
  line = f"round {rec['round'] + 1:>3}/{rounds}  train {_format_metrics(rec['train'])}"
  if "test" in rec:
    line += (f" | test mean_exit_acc {rec['test']['mean_exit_acc']:.3f} "
             f"mean_full_acc {rec['test']['mean_full_acc']:.3f}")
  return line + f" | {rec['images_per_s']:.0f} img/s {rec['seconds']:.1f}s"


def _check_finite(metrics: np.ndarray, rnd: int, cohort: fleet_lib.Cohort) -> None:
  bad = ~np.isfinite(metrics)
  if bad.any():
    pos, col = map(int, np.argwhere(bad)[0])
    raise RunError(f"round {rnd + 1}: non-finite {METRIC_NAMES[col]} "
                   f"({metrics[pos, col]}) on client {cohort.ids[pos]} (cut {cohort.cuts[pos]})")


def restore_state(sim: Simulation, ckpt: Checkpointer, cfg: Config, step: int | None = None,
                  log: Callable[[str], None] = print, allowed=(), prefer_upto: int | None = None):
  """(state, meta) from the newest intact checkpoint, or from ``step``.

  A checkpoint from another config is refused (fields in ``allowed`` may
  differ). Without ``step``, a damaged checkpoint is skipped with a note
  saying which and why, and the next older one is tried; with
  ``prefer_upto``, checkpoints after rounds <= it are tried first."""
  steps = ckpt.steps()
  if not steps:
    raise RunError(f"no complete checkpoint in {ckpt.directory}")
  if step is not None and step not in steps:
    raise RunError(f"no checkpoint after round {step} in {ckpt.directory}; have rounds {steps}")
  order = steps[::-1]
  if prefer_upto is not None:
    order = [s for s in order if s <= prefer_upto] + [s for s in order if s > prefer_upto]
  damaged = []
  for s in ([step] if step is not None else order):
    try:
      _, meta = ckpt.restore_meta(s)
      diff = config_differences(meta["config"], cfg, allowed)
      if diff:
        raise RunError(f"checkpoint in {ckpt.directory} is from a different config: "
                       + "; ".join(diff))
      state = ckpt.restore_state(sim.abstract_state(), s)
    except CheckpointError as e:
      if step is not None:
        others = [o for o in steps if o != s]
        raise RunError(f"{e}" + (f"; other checkpoints: after rounds {others}" if others else ""))
      log(f"[hsee] skipping: {e}")
      damaged.append(s)
      continue
    if damaged:
      log(f"[hsee] using the newest intact checkpoint, after round {s}")
    return state, meta
  raise RunError(f"no intact checkpoint in {ckpt.directory} (damaged: after rounds "
                 f"{sorted(damaged)})")


def train(cfg: Config, out_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
          log: Callable[[str], None] = print, dataset: data_lib.Dataset | None = None) -> dict:
  """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its newest
  intact checkpoint (with ``rounds`` raised, extend a finished run).

  The directory is locked while this process trains in it. SIGINT / SIGTERM
  stop the run after the round in flight, with a checkpoint
  (:class:`rundir.Stopped`); a second signal abandons the round
  (:class:`rundir.Abandoned`)."""
  return train_together([cfg], [out_dir], overwrite=overwrite, resume=[resume], logs=[log],
                        datasets=[dataset])[0]


def train_together(cfgs: list[Config], out_dirs: list, *, overwrite: bool = False,
                   resume: list[bool] | None = None, logs: list[Callable] | None = None,
                   datasets: list | None = None, log: Callable[[str], None] = print,
                   raise_errors: bool = True) -> list:
  """Train several runs in one loop, each into its own directory as
  :func:`train` would (same files, same metrics).

  Runs at the same round whose strategies can be stacked (Averaging runs with
  the same compiled programs and fleet shape: ``strategies.apply_runs``)
  train that round in the same compiled calls; the others take turns. A run
  that fails (non-finite values, a failed save) stops with its error
  recorded in its ``metrics.jsonl`` while the others go on; at the end the
  first failure is raised (after the other runs' summaries are written), or
  with ``raise_errors=False`` returned in that run's place. ``log`` gets the
  per-round line of the stacked runs."""
  n = len(cfgs)
  resume = resume or [False] * n
  logs = logs or [log] * n
  outs = [Path(o) for o in out_dirs]
  writer = distributed.is_writer()
  # several processes: process 0 writes and reports, the others compute (but
  # every process says when a signal reached it)
  signal_log = log
  logs, log = [distributed.writer_log(lg) for lg in logs], distributed.writer_log(log)
  with contextlib.ExitStack() as stack:
    if writer:
      for o, lg in zip(outs, logs):
        rundir.make_dir(o)
        stack.enter_context(rundir.RunLock(o).acquire(lg))
    stop = stack.enter_context(rundir.StopSignals(signal_log))
    if writer:
      for c, o, rs in zip(cfgs, outs, resume):
        rundir.prepare(o, json.dumps(c.to_dict(), indent=2), overwrite, rs)
    distributed.barrier("run-directories-ready")
    t_start = time.time()
    runs = []
    for c, o, rs, lg, (ds, sim) in zip(cfgs, outs, resume, logs,
                                       build_runs(cfgs, datasets, logs[0])):
      if writer:
        rundir.write_atomic(o / "fleet.json", json.dumps(sim.fleet.describe()))
      ckpt = stack.enter_context(Checkpointer(o / "checkpoints", keep=c.keep_checkpoints))
      runs.append(stack.enter_context(_Run(c, o, ckpt, ds, sim, rs, lg, writer)))
    try:
      _train_loop(runs, stop, log)
    except rundir.Abandoned as e:
      e.out = next((r.out for r in runs if not r.done), outs[0])
      raise
    # written while the directories are still locked
    summaries = [r.error if r.error is not None else r.summary(t_start) for r in runs]
  for r, summary in zip(runs, summaries):
    if r.error is not None or r.finished_before:
      continue
    for c in (summary["test"] or {}).get("cuts", []):
      r.log(f"[hsee] {evaluation.format_cut(c)}")
    r.log(f"[hsee] done in {summary['wall_seconds']:.1f}s; results in {r.out}")
  failed = [s for s in summaries if isinstance(s, RunError)]
  if failed and raise_errors:
    raise failed[0]
  return summaries


def _recorded_rounds(records: list[dict]) -> int:
  """How many rounds ``metrics.jsonl`` holds a record of (stop events aside)."""
  return 1 + max((r["round"] for r in records if "event" not in r), default=-1)


def _resume(cfg, out, ckpt, sim: Simulation, log, recorded: int, writer: bool = True):
  """State, first round and training key of a resumed run whose metrics
  hold ``recorded`` rounds; ``rounds`` may be raised to extend it (said
  plainly: the schedule changes)."""
  # A checkpoint is complete on disk before its round's record is written
  # (the save runs beside the evaluation whose results the record holds); a
  # run stopped between the two has a checkpoint ahead of metrics.jsonl. An
  # older checkpoint is then used and the rounds after it recomputed, exactly.
  state, meta = restore_state(sim, ckpt, cfg, log=log, allowed=("rounds",), prefer_upto=recorded)
  start, old_rounds = int(meta["round"]), int(meta["config"]["rounds"])
  if start > recorded:
    log(f"[hsee] metrics.jsonl has no record of rounds {recorded + 1}-{start}; they were trained "
        f"before the checkpoint after round {start}, which is the newest intact one")
  if start > cfg.rounds:
    raise RunError(f"rounds: {cfg.rounds}, but the checkpoint in {out} is after round {start}; "
                   f"give rounds >= {start}")
  if cfg.rounds != old_rounds:
    steps = sim.local_steps
    lr = float(sim.schedule(start * steps))
    how = ("the learning rate is constant, so this is exactly a run of "
           f"{cfg.rounds} rounds" if cfg.schedule == "constant" else
           f"the {cfg.schedule} schedule now spans {cfg.rounds} rounds and goes on from its "
           f"value at round {start + 1} (lr {lr:.4g}); rounds 1-{start} ran under the "
           f"{old_rounds}-round schedule, so this is not a {cfg.rounds}-round run from scratch "
           f"(with schedule=constant it would be)")
    log(f"[hsee] extending {out} from {old_rounds} to {cfg.rounds} rounds: {how}")
    if writer:
      rundir.write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
  return state, start, key_from_json(meta["train_key"])


def _train_loop(runs: list["_Run"], stop, log) -> None:
  """Rounds until every run is done or a stop signal: each time the runs at
  the lowest round train that round together. With several processes they
  agree at each round boundary whether a stop signal reached any of them."""
  while (signum := distributed.agreed_stop(stop.requested)) is None:
    active = [r for r in runs if not r.done]
    if not active:
      return
    rnd = min(r.rnd for r in active)
    now = [r for r in active if r.rnd == rnd]
    t0 = time.time()
    cohorts = [r.sim.cohort(rnd, r.train_key) for r in now]
    states, metrics = strategies.apply_runs([r.sim.algorithm for r in now],
                                            [r.state for r in now], cohorts)
    jax.block_until_ready(states)
    seconds = time.time() - t0
    images = sum(r.images_per_round for r in now)
    for r, state, m, cohort in zip(now, states, metrics, cohorts):
      r.state = state
      r.finish_round(np.asarray(m), cohort, seconds, images, len(now))
    if len(now) > 1:
      train = [r.records[-1]["train"] for r in now if r.error is None and r.records
               and r.records[-1]["round"] == rnd]
      if train:
        mean = {k: float(np.mean([t[k] for t in train])) for k in METRIC_NAMES}
        left = [r for r in runs if not r.done]
        log(f"[batch] round {rnd + 1}: {len(now)} runs  train {_format_metrics(mean)} "
            f"(means over runs) | {images / seconds:.0f} img/s "
            f"{seconds:.1f}s | runs left: {len(left)}, rounds left: "
            f"{sum(r.cfg.rounds - r.rnd for r in left)}")
  for r in runs:
    if not r.done:
      r.stop(signum)
  stopped = [r for r in runs if r.stopped]
  if stopped:
    raise rundir.Stopped(signum, stopped[0].rnd, stopped[0].out)


class _Run:
  """One run of :func:`train_together`: its state, directory, checkpoints and
  metrics file, and what a round writes."""

  def __init__(self, cfg, out, ckpt, dataset, sim: Simulation, resume: bool, log,
               writer: bool = True):
    self.cfg, self.out, self.ckpt, self.dataset, self.sim, self.log = cfg, out, ckpt, dataset, sim, log
    self.writer = writer  # this process writes the run's files (process 0)
    self.resume, self.error, self.stopped, self.finished_before = resume, None, False, False
    init_key, self.train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    self.start, self.records = 0, []
    if resume:
      records = rundir.read_records(out / "metrics.jsonl", log)
      recorded = _recorded_rounds(records)
      steps = ckpt.steps()
      if steps and min(steps) > recorded:
        # every checkpoint is ahead of the records (killed before the first
        # round's record was written): round 1 on, from the seed, exactly
        log(f"[hsee] metrics.jsonl records {recorded} rounds, every checkpoint of {out} is "
            f"after a later round: training again from round 1")
        self.state = sim.init_state(init_key)
        if writer:
          rundir.write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
      else:
        self.state, self.start, self.train_key = _resume(cfg, out, ckpt, sim, log, recorded,
                                                         writer)
      if self.start == cfg.rounds and (out / "summary.json").exists():
        log(f"[hsee] {out} is finished ({self.start} rounds); nothing to train. To train longer: "
            f"hsee train --resume {out} --set rounds=N (N > {self.start})")
        self.finished_before = True
      # rounds after the checkpoint are recomputed: drop their records
      self.records = [r for r in records if r["round"] < self.start]
      # several processes: every one has read the records and checkpoints
      # before process 0 moves or rewrites any of them
      distributed.barrier("resume-read")
      for later in [s for s in steps if s > self.start]:  # skipped by _resume
        if writer:
          why = "damaged" if later <= recorded else "unrecorded"
          log(f"[hsee] moved the {why} checkpoint after round {later} to "
              f"{ckpt.set_aside(later, why)}")
      if not self.finished_before:
        log(f"[hsee] resuming {out} from checkpoint after round {self.start}")
    else:
      self.state = sim.init_state(init_key)
    self.rnd = self.start
    self.images_per_round = cfg.cohort_size * sim.local_steps * cfg.batch_size
    self.test = next((r["test"] for r in reversed(self.records) if "test" in r), None)
    if self.finished_before:
      return
    fleet = sim.fleet
    tiers = ", ".join(f"{len(ids)} at cut {c}" for c, ids in fleet.groups.items())
    log(f"[hsee] {cfg.name}: {cfg.strategy}, {fleet.size} clients ({tiers}), "
        f"{cfg.cohort_size} per round, {dataset.name} {len(dataset.train_labels)} train / "
        f"{len(dataset.test_labels)} test, width {cfg.width}, {sim.local_steps} local steps x "
        f"batch {cfg.batch_size}, mode {sim.ctx.mode} (chunks of {sim.ctx.chunk}), "
        f"backend {jax.default_backend()}")
    log(f"[hsee] persistent state: {_state_mib(self.state):.1f} MiB; per client "
        + ", ".join(f"{b / 2**10:.1f} KiB at cut {c}"
                    for c, b in sim.algorithm.per_client_bytes.items()))
    # the kept history goes back in one atomic replace, then new rounds are appended
    if writer:
      rundir.write_atomic(out / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in self.records))
    if resume:
      distributed.barrier("resume-written")
      ckpt.reload()  # the checkpoints process 0 set aside are gone from every process's view

  def __enter__(self):
    self.mfile = (None if self.finished_before or not self.writer
                  else open(self.out / "metrics.jsonl", "a"))
    # the metric writers besides metrics.jsonl (writers.py), process 0 only
    self.writers = [] if self.mfile is None else writers.for_config(self.cfg, self.out)
    for w in self.writers:
      w.write_config(self.cfg)
    return self

  def __exit__(self, *exc):
    for w in self.writers:
      w.close()
    if self.mfile is not None:
      self.mfile.close()

  @property
  def done(self) -> bool:
    return (self.finished_before or self.error is not None or self.stopped
            or self.rnd >= self.cfg.rounds)

  def _last(self) -> str:
    last = self.ckpt.latest_step()
    return "none" if last is None else f"after round {last}"

  def _write(self, record):
    if not self.writer:
      return
    try:
      self.mfile.write(json.dumps(record) + "\n")
      self.mfile.flush()
    except OSError as e:
      raise RunError(f"cannot write {self.out / 'metrics.jsonl'}: {e.strerror or e}; newest "
                     f"checkpoint: {self._last()}") from None

  def _fail(self, error: str, local: bool = False) -> None:
    """Record the error in the metrics file; the run stops here. A ``local``
    error (a save or a write) may have struck this process alone: with
    several processes it ends them all now, as the others would wait for
    this one in the next collective (non-finite values are the same on
    every process, which all record them and go on with their other runs)."""
    distributed.yield_to_watcher()
    try:
      self._write({"round": self.rnd, "event": "stopped", "error": error})
    except RunError:
      pass
    self.error = RunError(error)
    self.log(f"[hsee] {error}")
    if local and distributed.several_processes():
      distributed.fail(f"{self.out}: {error}", 2)

  def finish_round(self, metrics: np.ndarray, cohort, seconds: float, images: int,
                   stacked: int) -> None:
    """Checks, checkpoint, evaluation and the metrics record of round ``self.rnd``."""
    cfg, rnd = self.cfg, self.rnd
    try:
      _check_finite(metrics, rnd, cohort)
      bad = self.sim.algorithm.nonfinite_parts(self.state, cohort.ids)
      if bad:
        raise RunError(f"round {rnd + 1}: non-finite parameters in {', '.join(bad)}")
    except RunError as e:
      return self._fail(f"{e}; last good checkpoint: {self._last()}")
    rec = {"round": rnd, "seconds": seconds, "images_per_s": images / seconds,
           "train": dict(zip(METRIC_NAMES, map(float, metrics.mean(0)))),
           "train_per_client": [{"client": int(i), "cut": int(c),
                                 **dict(zip(METRIC_NAMES, map(float, m)))}
                                for i, c, m in zip(cohort.ids, cohort.cuts, metrics)]}
    if stacked > 1:
      rec["stacked_runs"] = stacked  # seconds and images/s are those of all of them
    last_round = rnd + 1 == cfg.rounds
    # the save is written while the round is evaluated, and checked before it ends
    saving = last_round or (cfg.checkpoint_every and (rnd + 1) % cfg.checkpoint_every == 0)
    try:
      if saving:
        self.ckpt.save(rnd + 1, self.state, meta_for(cfg, rnd + 1, self.train_key))
      if (rnd + 1) % cfg.eval_every == 0 or last_round:
        self.test = evaluation.evaluate(self.sim, self.state, self.dataset, cfg.exit_thresholds,
                                        cfg.eval_batch_size)
        rec["test"] = self.test
    except CheckpointError as e:
      return self._fail(f"round {rnd + 1}: {e}; the checkpoint before it is intact: "
                        f"{self._last()}", local=True)
    try:
      self._write(rec)  # before the older checkpoints are dropped (finish)
    except RunError as e:
      return self._fail(f"{e}", local=True)
    if saving:
      try:
        self.ckpt.finish(rnd + 1)
      except CheckpointError as e:
        return self._fail(f"round {rnd + 1}: {e}; the checkpoint before it is intact: "
                          f"{self._last()}", local=True)
    self.records.append(rec)
    for w in self.writers:
      w.write_round(rec)
    self.log(_format_round(rec, cfg.rounds))
    self.rnd += 1

  def stop(self, signum) -> None:
    """A stop signal: save what was trained (if not saved yet), then stop."""
    if self.ckpt.latest_step() != self.rnd:
      try:
        self.ckpt.save(self.rnd, self.state, meta_for(self.cfg, self.rnd, self.train_key))
        self.ckpt.finish(self.rnd)
      except CheckpointError as e:
        self.error = RunError(f"stopping after round {self.rnd}: {e}")
        return
    self._write({"round": self.rnd, "event": "stopped",
                 "error": f"{signal.Signals(signum).name} after round {self.rnd}"})
    self.stopped = True

  def summary(self, t_start: float) -> dict:
    if self.finished_before:
      try:
        return rundir.read_summary(self.out)
      except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{self.out / 'summary.json'} is damaged ({e}); the run's checkpoints are "
                       f"intact: hsee eval --run {self.out}") from None
    cfg, fleet, sim = self.cfg, self.sim.fleet, self.sim
    summary = {
        "config": cfg.to_dict(), "rounds": cfg.rounds, "local_steps": sim.local_steps,
        "backend": jax.default_backend(), "resumed_from_round": self.start if self.resume else None,
        "num_clients": fleet.size, "clients_per_round": cfg.cohort_size,
        "cuts": fleet.cuts.tolist(),
        "clients_per_cut": {str(c): len(ids) for c, ids in fleet.groups.items()},
        "per_client_state_bytes": {str(c): b for c, b in sim.algorithm.per_client_bytes.items()},
        "test": self.test, "wall_seconds": time.time() - t_start,
        "processes": jax.process_count()}
    if self.writer:
      rundir.write_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _state_mib(state) -> float:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state)) / 2**20


def evaluate_run(run_dir: str | Path, step: int | None = None,
                 log: Callable[[str], None] = print) -> dict:
  """Test metrics of a run's newest (or a named) checkpoint, without training."""
  run = Path(run_dir)
  cfg = config_lib.load_run_config(run)
  dataset, sim = build(cfg)
  try:
    ckpt = Checkpointer(run / "checkpoints", keep=cfg.keep_checkpoints, create=False)
  except CheckpointError as e:
    raise RunError(str(e)) from None
  with ckpt:
    state, meta = restore_state(sim, ckpt, cfg, step, log)
  result = {"run": str(run), "checkpoint_round": meta["round"],
            "test": evaluation.evaluate(sim, state, dataset, cfg.exit_thresholds,
                                        cfg.eval_batch_size)}
  path = run / f"eval_round{meta['round']}.json"
  log(f"[hsee] {run}: checkpoint after round {meta['round']}")
  log(evaluation.format_table(result["test"]))   # first: a write that fails loses nothing shown
  try:
    rundir.write_atomic(path, json.dumps(result, indent=2))
  except RunError as e:
    raise RunError(f"{e}; the metrics above were not saved") from None
  log(f"[hsee] written {path}")
  return result
