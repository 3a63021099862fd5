"""A training run: build everything from a Config, train for cfg.rounds rounds,
evaluate, and write ``config.json``, ``metrics.jsonl`` and ``summary.json``."""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax import data as data_lib
from hsee_jax import config as config_lib
from hsee_jax import evaluation, models, optim, rundir, strategies
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
    return self.algorithm.init(key)

  def abstract_state(self):
    """Shapes and dtypes of the state (for restoring checkpoints)."""
    return jax.eval_shape(self.algorithm.init, jax.random.PRNGKey(0))

  def cohort(self, rnd: int, base_key) -> fleet_lib.Cohort:
    return fleet_lib.make_cohort(self.fleet, self.cfg, rnd, self.local_steps, self.schedule,
                                 base_key)

  def run_round(self, state, rnd: int, base_key):
    """One round: sample the cohort, train it; (state, metrics [C, 4] as numpy, cohort)."""
    cohort = self.cohort(rnd, base_key)
    state, metrics = self.algorithm.apply(state, cohort)
    return state, np.asarray(metrics), cohort


def build(cfg: Config, dataset: data_lib.Dataset | None = None,
          log: Callable[[str], None] | None = None) -> tuple[data_lib.Dataset, Simulation]:
  """Dataset, fleet, network, optimiser and strategy for a config."""
  dataset = dataset if dataset is not None else data_lib.load_dataset(cfg)
  try:
    fleet = fleet_lib.build_fleet(cfg, dataset, log)
  except fleet_lib.FleetError as e:
    raise RunError(str(e)) from None
  steps = cfg.local_steps or max(1, math.ceil(float(np.mean(fleet.sizes)) / cfg.batch_size))
  net = models.SplitResNet18(dataset.num_classes, cfg.width, cfg.exit_head)
  tx = optim.make_optimizer(cfg)
  schedule = optim.make_schedule(cfg, cfg.rounds * steps)
  shared = strategies.Shared(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels),
                             jnp.asarray(dataset.mean), jnp.asarray(dataset.std))
  ctx = strategies.Context(cfg, net, tx, fleet, shared, dataset.image_shape)
  algorithm = strategies.STRATEGIES[cfg.strategy](ctx)
  return dataset, Simulation(cfg, fleet, ctx, algorithm, steps, schedule)


def _format_round(rec: dict, rounds: int) -> str:
  m = rec["train"]
  line = (f"round {rec['round'] + 1:>3}/{rounds}  loss client {m['loss_client']:.3f} "
          f"server {m['loss_server']:.3f}  train acc client {m['acc_client']:.3f} "
          f"server {m['acc_server']:.3f}")
  if "test" in rec:
    line += (f" | test exit {rec['test']['mean_exit_acc']:.3f} "
             f"server {rec['test']['mean_server_acc']:.3f}")
  return line + f" | {rec['images_per_s']:.0f} img/s {rec['seconds']:.1f}s"


def _check_finite(metrics: np.ndarray, rnd: int, cohort: fleet_lib.Cohort) -> None:
  bad = ~np.isfinite(metrics)
  if bad.any():
    pos, col = map(int, np.argwhere(bad)[0])
    raise RunError(f"round {rnd + 1}: non-finite {METRIC_NAMES[col]} "
                   f"({metrics[pos, col]}) on client {cohort.ids[pos]} (cut {cohort.cuts[pos]})")


def restore_state(sim: Simulation, ckpt: Checkpointer, cfg: Config, step: int | None = None,
                  log: Callable[[str], None] = print, allowed=()):
  """(state, meta) from the newest intact checkpoint, or from ``step``.

  A checkpoint from another config is refused (fields in ``allowed`` may
  differ). Without ``step``, a damaged checkpoint is skipped with a note
  saying which and why, and the next older one is tried."""
  steps = ckpt.steps()
  if not steps:
    raise RunError(f"no complete checkpoint in {ckpt.directory}")
  if step is not None and step not in steps:
    raise RunError(f"no checkpoint after round {step} in {ckpt.directory}; have rounds {steps}")
  damaged = []
  for s in ([step] if step is not None else steps[::-1]):
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
  out = Path(out_dir)
  rundir.make_dir(out)
  with rundir.RunLock(out).acquire(log), rundir.StopSignals(log) as stop:
    rundir.prepare(out, json.dumps(cfg.to_dict(), indent=2), overwrite, resume)
    t_start = time.time()
    dataset, sim = build(cfg, dataset, log)
    rundir.write_atomic(out / "fleet.json", json.dumps(sim.fleet.describe()))
    try:
      with Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints) as ckpt:
        summary = _train_loop(cfg, out, ckpt, dataset, sim, resume, stop, log)
    except rundir.Abandoned as e:
      e.out = out
      raise
    if summary is None:  # a finished run, resumed with nothing left to train
      try:
        return json.loads((out / "summary.json").read_text())
      except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{out / 'summary.json'} is damaged ({e}); the run's checkpoints are "
                       f"intact: hsee eval --run {out}") from None
    summary["wall_seconds"] = time.time() - t_start
    rundir.write_atomic(out / "summary.json", json.dumps(summary, indent=2))
  for c in (summary["test"] or {}).get("cuts", []):
    log(f"[hsee] {evaluation.format_cut(c)}")
  log(f"[hsee] done in {summary['wall_seconds']:.1f}s; results in {out}")
  return summary


def _resume(cfg, out, ckpt, sim: Simulation, log):
  """State, first round and training key of a resumed run; ``rounds`` may be
  raised to extend it (said plainly: the schedule changes)."""
  state, meta = restore_state(sim, ckpt, cfg, log=log, allowed=("rounds",))
  start, old_rounds = int(meta["round"]), int(meta["config"]["rounds"])
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
    rundir.write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
  return state, start, key_from_json(meta["train_key"])


def _train_loop(cfg, out, ckpt, dataset, sim: Simulation, resume, stop, log) -> dict | None:
  """Train rounds; the summary, or None for a finished run with nothing to train."""
  init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
  start, records = 0, []
  if resume:
    state, start, train_key = _resume(cfg, out, ckpt, sim, log)
    if start == cfg.rounds and (out / "summary.json").exists():
      log(f"[hsee] {out} is finished ({start} rounds); nothing to train. To train longer: "
          f"hsee train --resume {out} --set rounds=N (N > {start})")
      return None
    # rounds after the checkpoint are recomputed: drop their records
    records = [r for r in rundir.read_records(out / "metrics.jsonl", log) if r["round"] < start]
    for later in [s for s in ckpt.steps() if s > start]:   # damaged ones, skipped by _resume
      log(f"[hsee] moved the damaged checkpoint after round {later} to {ckpt.set_aside(later)}")
    log(f"[hsee] resuming {out} from checkpoint after round {start}")
  else:
    state = sim.init_state(init_key)
  fleet = sim.fleet
  tiers = ", ".join(f"{len(ids)} at cut {c}" for c, ids in fleet.groups.items())
  log(f"[hsee] {cfg.name}: {cfg.strategy}, {fleet.size} clients ({tiers}), "
      f"{cfg.cohort_size} per round, {dataset.name} {len(dataset.train_labels)} train / "
      f"{len(dataset.test_labels)} test, width {cfg.width}, {sim.local_steps} local steps x "
      f"batch {cfg.batch_size}, mode {sim.ctx.mode} (chunks of {sim.ctx.chunk}), "
      f"backend {jax.default_backend()}")
  log(f"[hsee] persistent state: {_state_mib(state):.1f} MiB; per client "
      + ", ".join(f"{b / 2**10:.1f} KiB at cut {c}" for c, b in sim.algorithm.per_client_bytes.items()))
  images_per_round = cfg.cohort_size * sim.local_steps * cfg.batch_size
  test = next((r["test"] for r in reversed(records) if "test" in r), None)
  # the kept history goes back in one atomic replace, then new rounds are appended
  rundir.write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

  def write(mfile, record):
    try:
      mfile.write(json.dumps(record) + "\n")
      mfile.flush()
    except OSError as e:
      last = ckpt.latest_step()
      raise RunError(f"cannot write {out / 'metrics.jsonl'}: {e.strerror or e}; newest "
                     f"checkpoint: {'none' if last is None else 'after round ' + str(last)}") from None

  def stop_line(mfile, rnd, error):
    write(mfile, {"round": rnd, "event": "stopped", "error": error})

  with open(out / "metrics.jsonl", "a") as mfile:
    rnd = start
    while rnd < cfg.rounds and stop.requested is None:
      t0 = time.time()
      state, metrics, cohort = sim.run_round(state, rnd, train_key)
      jax.block_until_ready(state)
      seconds = time.time() - t0
      try:
        _check_finite(metrics, rnd, cohort)
        bad = sim.algorithm.nonfinite_parts(state, cohort.ids)
        if bad:
          raise RunError(f"round {rnd + 1}: non-finite parameters in {', '.join(bad)}")
      except RunError as e:
        stop_line(mfile, rnd, str(e))
        last = ckpt.latest_step()
        raise RunError(f"{e}; last good checkpoint: "
                       f"{'none' if last is None else 'after round ' + str(last)}") from None
      rec = {"round": rnd, "seconds": seconds, "images_per_s": images_per_round / seconds,
             "train": dict(zip(METRIC_NAMES, map(float, metrics.mean(0)))),
             "train_per_client": [{"client": int(i), "cut": int(c),
                                   **dict(zip(METRIC_NAMES, map(float, m)))}
                                  for i, c, m in zip(cohort.ids, cohort.cuts, metrics)]}
      last_round = rnd + 1 == cfg.rounds
      # the save is written while the round is evaluated, and checked before it ends
      saving = last_round or (cfg.checkpoint_every and (rnd + 1) % cfg.checkpoint_every == 0)
      try:
        if saving:
          ckpt.save(rnd + 1, state, meta_for(cfg, rnd + 1, train_key))
        if (rnd + 1) % cfg.eval_every == 0 or last_round:
          test = evaluation.evaluate(sim, state, dataset, cfg.exit_thresholds, cfg.eval_batch_size)
          rec["test"] = test
        if saving:
          ckpt.finish(rnd + 1)
      except CheckpointError as e:
        stop_line(mfile, rnd, str(e))
        last = ckpt.latest_step()
        raise RunError(f"round {rnd + 1}: {e}; the checkpoint before it is intact: "
                       f"{'none' if last is None else 'after round ' + str(last)}") from None
      write(mfile, rec)
      log(_format_round(rec, cfg.rounds))
      rnd += 1
    if rnd < cfg.rounds:  # a stop signal: save what was trained, then stop
      if ckpt.latest_step() != rnd:
        try:
          ckpt.save(rnd, state, meta_for(cfg, rnd, train_key))
          ckpt.finish(rnd)
        except CheckpointError as e:
          raise RunError(f"stopping after round {rnd}: {e}") from None
      stop_line(mfile, rnd, f"{signal.Signals(stop.requested).name} after round {rnd}")
      raise rundir.Stopped(stop.requested, rnd, out)

  return {"config": cfg.to_dict(), "rounds": cfg.rounds, "local_steps": sim.local_steps,
          "backend": jax.default_backend(), "resumed_from_round": start if resume else None,
          "num_clients": fleet.size, "clients_per_round": cfg.cohort_size,
          "cuts": fleet.cuts.tolist(),
          "clients_per_cut": {str(c): len(ids) for c, ids in fleet.groups.items()},
          "per_client_state_bytes": {str(c): b for c, b in sim.algorithm.per_client_bytes.items()},
          "test": test}


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
  rundir.write_atomic(path, json.dumps(result, indent=2))
  log(f"[hsee] {run}: checkpoint after round {meta['round']}")
  log(evaluation.format_table(result["test"]))
  log(f"[hsee] written {path}")
  return result
