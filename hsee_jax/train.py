"""A training run: build everything from a Config, train for cfg.rounds rounds,
evaluate, and write ``config.json``, ``metrics.jsonl`` and ``summary.json``."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax import data as data_lib
from hsee_jax import config as config_lib
from hsee_jax import evaluation, models, optim, strategies
from hsee_jax import fleet as fleet_lib
from hsee_jax.checkpoint import (CheckpointError, Checkpointer, config_differences,
                                 key_from_json, meta_for)
from hsee_jax.config import Config
from hsee_jax.strategies import METRIC_NAMES


class RunError(RuntimeError):
  """A run that cannot go on; the message is one line naming the problem."""


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


def _read_records(path: Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _prepare_out_dir(out: Path, cfg: Config, overwrite: bool, resume: bool) -> None:
  ckpt_dir = out / "checkpoints"
  if resume:
    if not ckpt_dir.is_dir():
      raise RunError(f"--resume: no checkpoints in {out} (expected {ckpt_dir})")
    return
  if (out / "metrics.jsonl").exists() or ckpt_dir.exists():
    if not overwrite:
      raise RunError(f"output directory {out} already holds a run; pass --resume to continue "
                     f"it or --overwrite to replace it")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def restore_state(sim: Simulation, ckpt: Checkpointer, cfg: Config, step: int | None = None):
  """(state, meta) from a checkpoint, refused if it came from another config."""
  try:
    step, meta = ckpt.restore_meta(step)
    diff = config_differences(meta["config"], cfg)
    if diff:
      raise RunError(f"checkpoint in {ckpt.directory} is from a different config: "
                     + "; ".join(diff))
    return ckpt.restore_state(sim.abstract_state(), step), meta
  except CheckpointError as e:
    raise RunError(str(e)) from None


def train(cfg: Config, out_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
          log: Callable[[str], None] = print, dataset: data_lib.Dataset | None = None) -> dict:
  """Train ``cfg`` into ``out_dir``; with ``resume`` continue from its newest checkpoint."""
  out = Path(out_dir)
  _prepare_out_dir(out, cfg, overwrite, resume)
  t_start = time.time()
  dataset, sim = build(cfg, dataset, log)
  (out / "fleet.json").write_text(json.dumps(sim.fleet.describe()))
  with Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints) as ckpt:
    summary = _train_loop(cfg, out, ckpt, dataset, sim, resume, log)
  summary["wall_seconds"] = time.time() - t_start
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  for c in (summary["test"] or {}).get("cuts", []):
    log(f"[hsee] {evaluation.format_cut(c)}")
  log(f"[hsee] done in {summary['wall_seconds']:.1f}s; results in {out}")
  return summary


def _train_loop(cfg, out, ckpt, dataset, sim: Simulation, resume, log) -> dict:
  init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
  start, records = 0, []
  if resume:
    state, meta = restore_state(sim, ckpt, cfg)
    start, train_key = int(meta["round"]), key_from_json(meta["train_key"])
    # rounds after the checkpoint are recomputed: drop their records
    records = [r for r in _read_records(out / "metrics.jsonl") if r["round"] < start]
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
  tmp = out / "metrics.jsonl.tmp"
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  os.replace(tmp, out / "metrics.jsonl")
  with open(out / "metrics.jsonl", "a") as mfile:
    for rnd in range(start, cfg.rounds):
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
        mfile.write(json.dumps({"round": rnd, "event": "stopped", "error": str(e)}) + "\n")
        last = ckpt.latest_step()
        raise RunError(f"{e}; last good checkpoint: "
                       f"{'after round ' + str(last) if last else 'none'}") from None
      rec = {"round": rnd, "seconds": seconds, "images_per_s": images_per_round / seconds,
             "train": dict(zip(METRIC_NAMES, map(float, metrics.mean(0)))),
             "train_per_client": [{"client": int(i), "cut": int(c),
                                   **dict(zip(METRIC_NAMES, map(float, m)))}
                                  for i, c, m in zip(cohort.ids, cohort.cuts, metrics)]}
      last_round = rnd + 1 == cfg.rounds
      if (rnd + 1) % cfg.eval_every == 0 or last_round:
        test = evaluation.evaluate(sim, state, dataset, cfg.exit_thresholds, cfg.eval_batch_size)
        rec["test"] = test
      mfile.write(json.dumps(rec) + "\n")
      mfile.flush()
      log(_format_round(rec, cfg.rounds))
      if last_round or (cfg.checkpoint_every and (rnd + 1) % cfg.checkpoint_every == 0):
        ckpt.save(rnd + 1, state, meta_for(cfg, rnd + 1, train_key))

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
  if not (run / "config.json").exists():
    raise RunError(f"{run} holds no run (no config.json)")
  cfg = config_lib.from_dict(json.loads((run / "config.json").read_text()))
  dataset, sim = build(cfg)
  try:
    ckpt = Checkpointer(run / "checkpoints", keep=cfg.keep_checkpoints, create=False)
  except CheckpointError as e:
    raise RunError(str(e)) from None
  with ckpt:
    state, meta = restore_state(sim, ckpt, cfg, step)
  result = {"run": str(run), "checkpoint_round": meta["round"],
            "test": evaluation.evaluate(sim, state, dataset, cfg.exit_thresholds,
                                        cfg.eval_batch_size)}
  path = run / f"eval_round{meta['round']}.json"
  path.write_text(json.dumps(result, indent=2))
  log(f"[hsee] {run}: checkpoint after round {meta['round']}")
  log(evaluation.format_table(result["test"]))
  log(f"[hsee] written {path}")
  return result
