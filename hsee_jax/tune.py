"""Ray Tune: a run of hsee_jax as a Tune trainable, and a sweep whose
hopeless runs ASHA stops early (``hsee sweep ... --stop-early asha``).

:func:`trainable` is a Tune function trainable that trains one ordinary run
(its own directory, lock, orbax checkpoints and records) and, after each
evaluation, reports the test metrics (``round``, ``mean_exit_acc``,
``mean_full_acc``, ``exit_acc_cut<l>``, ``full_acc_cut<l>``: the sweep's
names) with a Tune checkpoint that names the run directory and the round. A trial
restored from its own (Tune's pause and resume, a trial moved after a lost
worker) resumes its run from the newest orbax checkpoint; a trial given
another trial's (PBT's exploit) begins its run again from that run's state
after that round, with its own (perturbed) hyperparameters
(:func:`hsee_jax.train.train`'s ``begin_from``).
``config["hsee"]`` is the run's config as a dict (``Config.to_dict()``);
top-level entries that are config fields (Tune's search space) override
it; ``config["run_dir"]`` its directory, or ``config["runs"]``: a
directory that holds each trial's run under the name of the trial's
directory (default:
``run`` in the trial's working directory, which Ray keeps under its own
temporary files). ``examples/tune_search.py`` runs a search of Tune's own with it.

:func:`train_runs` is the sweep's launcher with ASHA
(:func:`hsee_jax.sweep.run_sweep`'s ``launcher``): each run a Tune trial
with its share of the machine (:func:`hsee_jax.ray_sweep.task_resources`),
``--workers`` at a time, ASHA (rungs at the runs' evaluations, reduction
factor 2) stopping the runs it ranks hopeless on ``--metric``; a stopped run
keeps its directory, records and completed checkpoints, and the sweep's
tables mark it with its last round (``DIR/stopped_early.json``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from hsee_jax import config as config_lib
from hsee_jax import ray_sweep, rundir
from hsee_jax.config import Config, ConfigError

POINTER = "hsee_run.json"      # a Tune checkpoint of hsee_jax: the run directory it stands for
STOPPED = "stopped_early.json"  # run name -> the last round of a run ASHA stopped
METRICS = ("mean_exit_acc", "mean_full_acc")


def import_tune():
  ray_sweep.import_ray()
  try:
    from ray import tune
  except ImportError:
    raise ConfigError("--stop-early: needs Ray Tune; install the extra: "
                      f"{ray_sweep.EXTRA}") from None
  return tune


def test_metrics(test: dict) -> dict:
  """An evaluation's test metrics under the sweep's names."""
  out = {m: test[m] for m in METRICS}
  for c in test["cuts"]:
    out[f"exit_acc_cut{c['cut']}"] = c["exit_acc"]["mean"]
    out[f"full_acc_cut{c['cut']}"] = c["full_acc"]["mean"]
  return out


class _Report:
  """A run's writer that reports each evaluation to Tune (:class:`hsee_jax.writers.Writer`)."""

  def __init__(self, tune, run_dir: Path):
    self.tune, self.run_dir = tune, run_dir

  def begin(self, cfg, records) -> None:
    pass

  def write_round(self, record: dict) -> None:
    if "test" not in record:
      return
    with tempfile.TemporaryDirectory() as d:
      done = record["round"] + 1   # records count rounds from 0; "round" is the rounds done
      Path(d, POINTER).write_text(json.dumps({"run_dir": str(self.run_dir), "round": done}))
      self.tune.report({"round": done, **test_metrics(record["test"])},
                       checkpoint=self.tune.Checkpoint.from_directory(d))

  def write_event(self, record: dict) -> None:
    pass

  def close(self) -> None:
    pass


def trainable(config: dict) -> None:
  """One run of hsee_jax as a Tune trial (the module's docstring)."""
  from ray import tune
  from hsee_jax import train as train_lib
  base = config_lib.from_dict(config["hsee"])
  names = {f.name for f in dataclasses.fields(Config)}
  cfg = config_lib.override(base, [f"{k}={v!r}" for k, v in config.items() if k in names])
  context = tune.get_context()
  run_dir = Path(config.get("run_dir") or
                 (Path(config["runs"]) / Path(context.get_trial_dir()).name if config.get("runs")
                  else Path(context.get_trial_dir()) / "run"))
  begin_from, checkpoint = None, tune.get_checkpoint()
  if checkpoint is not None:
    with checkpoint.as_directory() as d:
      pointer = json.loads(Path(d, POINTER).read_text())
    if Path(pointer["run_dir"]).resolve() != run_dir.resolve():   # PBT: another trial's run
      begin_from = (pointer["run_dir"], int(pointer["round"]))
  run = rundir.RunDir(run_dir)
  resume = begin_from is None and run.path.exists() and bool(run.checkpoint_rounds())
  log_file = config.get("log")
  with open(log_file, "a", buffering=1) if log_file else open(os.devnull, "w") as f:
    f.write(f"[tune] trial of {run_dir}: process {os.getpid()}"
            + (", resuming" if resume else "")
            + (f", begun from {begin_from[0]} after round {begin_from[1]}" if begin_from else "")
            + "\n")
    train_lib.train(cfg, run_dir, overwrite=True, resume=resume, begin_from=begin_from,
                    log=(lambda s: f.write(s + "\n")) if log_file else print,
                    writers=(_Report(tune, run_dir),))


def _trial(config: dict, plans: dict) -> None:
  cfg_dict, run_dir, log_file = plans[config["run"]]
  trainable({"hsee": cfg_dict, "run_dir": run_dir, "log": log_file})


def _resources(options: dict) -> dict:
  out = {"cpu": options.get("num_cpus", 1)}
  if options.get("num_gpus"):
    out["gpu"] = options["num_gpus"]
  out.update(options.get("resources", {}))
  return out


def train_runs(runs: list, out: Path, *, placement: ray_sweep.Placement, metric: str,
               resume: bool = False, log: Callable[[str], None] = print,
               errors: dict | None = None) -> list[str]:
  """The runs of a sweep as Tune trials under ASHA (the module's docstring).
  Returns the failed runs' names."""
  from hsee_jax.sweep import _done
  tune = import_tune()
  from ray.tune.schedulers import ASHAScheduler
  todo = [r for r in runs if not (resume and _done(out / r.name, r.cfg.rounds))]
  if metric not in METRICS and not metric.startswith(("exit_acc_cut", "full_acc_cut")):
    raise ConfigError(f"--metric {metric}: give one of {', '.join(METRICS)}, exit_acc_cut<l>, "
                      f"full_acc_cut<l>")
  logs = out / "logs"
  rundir.make_dir(logs)
  ray, started, env = ray_sweep.start(out, placement, log)
  try:
    options, task_env = ray_sweep.task_resources(ray.cluster_resources(), placement)
    os.environ.update({**env, **task_env})   # the trials' actors start from this environment
    plans = {r.name: (r.cfg.to_dict(), str((out / r.name).resolve()),
                      str((logs / f"{ray_sweep.slug(r.name)}.log").resolve())) for r in todo}
    rounds = max((r.cfg.rounds for r in todo), default=1)
    grace = min((r.cfg.eval_every for r in todo), default=1)
    log(f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} finished before; {len(todo)} as Tune "
        f"trials, {placement.workers} at a time; ASHA on {metric} (rungs from round {grace}, "
        f"reduction factor 2, up to round {rounds})")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # Tune's own tables off (verbose=0)
    fn = tune.with_resources(tune.with_parameters(_trial, plans=plans), _resources(options))
    tuner = tune.Tuner(
        fn, param_space={"run": tune.grid_search(list(plans))},
        tune_config=tune.TuneConfig(
            # max_t past the last round: ASHA stopping a trial at its last report would end
            # it before the run writes its summary
            scheduler=ASHAScheduler(time_attr="round", metric=metric, mode="max", max_t=rounds + 1,
                                    grace_period=grace, reduction_factor=2),
            max_concurrent_trials=placement.workers),
        run_config=tune.RunConfig(name="tune", storage_path=str((out / "tune").resolve()),
                                  verbose=0, callbacks=[_progress(tune, log, len(todo))],
                                  failure_config=tune.FailureConfig(max_failures=ray_sweep.RETRIES)))
    results = tuner.fit() if todo else []
    failed, stopped = [], {}
    old = out / STOPPED
    if resume and old.exists():
      stopped.update(json.loads(old.read_text()))
    for result in results:
      name = result.config["run"]
      r = next(x for x in todo if x.name == name)
      stopped.pop(name, None)
      if _done(out / name, r.cfg.rounds):
        continue
      if result.error is not None:
        failed.append(name)
        if errors is not None:
          errors[name] = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
        continue
      stopped[name] = int((result.metrics or {}).get("round", 0))
    rundir.write_atomic(old, json.dumps(stopped, indent=1, sort_keys=True))
    return failed
  finally:
    if started:
      ray.shutdown()


def _progress(tune, log: Callable[[str], None], total: int):
  """A Tune callback: one line per trial that ended (finished or stopped by
  ASHA) or failed, with the count, the elapsed time and an estimate of the rest."""
  import time

  class Progress(tune.Callback):
    def __init__(self):
      self.done, self.t0 = 0, time.time()

    def _line(self, trial, what):
      self.done += 1
      elapsed, left = time.time() - self.t0, total - self.done
      log(f"[sweep] {trial.config['run']} {what} | {self.done}/{total} trials, "
          f"{ray_sweep.clock(elapsed)} elapsed"
          + (f", about {ray_sweep.clock(elapsed / self.done * left)} left" if left else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
      last = trial.last_result or {}
      full = last.get("mean_full_acc")
      self._line(trial, f"ended after round {last.get('round')}"
                 + (f": mean_full_acc {full:.4f}" if full is not None else ""))

    def on_trial_error(self, iteration, trials, trial, **info):
      self._line(trial, "failed")
  return Progress()
