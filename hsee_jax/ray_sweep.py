"""A sweep's runs as Ray tasks: ``hsee sweep ... --workers N`` (N runs at a
time on a Ray started in this process) or ``--ray-address ADDR`` (an
existing cluster; the sweep directory on a filesystem every node sees).

Ray (an extra: ``pip install -e '.[ray]'``) places each run on a worker
with its share of the machine: one GPU by default where there are GPUs (a
fraction with ``--gpus-per-run F``, and then JAX's memory preallocation set
to that fraction), TPU chips split evenly on TPUs, the cores split evenly
on a CPU (a run of one core runs XLA single-threaded). Ray retries a task
whose worker is lost (its process killed, its node gone); the retried task
resumes the run from its newest checkpoint. Everything else is the
sequential sweep's (:mod:`hsee_jax.sweep`): each run keeps its own
directory, lock, checkpoints and records; the driver alone writes
``sweep.json``, ``sweep.csv``, ``sweep.md`` and the plots; ``hsee sweep
--resume`` finishes only what is missing. The workers share JAX's
persistent compilation cache (``DIR/compile_cache``): a batch's first run
(runs that differ only in fields the programs take as inputs) compiles its
programs before the batch's other runs start, and they read them from disk. Each run's own lines go
to ``DIR/logs/<run>.log``; the driver prints one line per finished, failed
or stopped run with the overall count, the elapsed time and an estimate
of the rest.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

from hsee_jax import rundir, stopping
from hsee_jax.config import ConfigError

EXTRA = "pip install -e '.[ray]'"
RETRIES = 3          # a task whose worker is lost is run again up to this many times


@dataclasses.dataclass(frozen=True)
class Placement:
  """How the runs of a sweep go to Ray: ``workers`` runs at a time, on the
  cluster at ``address`` (None: a Ray started in this process), each with
  ``gpus_per_run`` GPUs (None: 1 where the cluster has GPUs)."""
  workers: int
  address: str | None = None
  gpus_per_run: float | None = None

  def __post_init__(self):
    if self.workers < 1:
      raise ConfigError(f"--workers {self.workers}: give 1 or more")
    if self.gpus_per_run is not None and not 0 < self.gpus_per_run <= 8:
      raise ConfigError(f"--gpus-per-run {self.gpus_per_run}: give a share in (0, 8]")


def import_ray():
  """Ray, or a one-line error naming the extra that installs it."""
  try:
    import ray
  except ImportError:
    raise ConfigError(f"--workers / --ray-address: Ray is not installed; install the extra: "
                      f"{EXTRA}") from None
  return ray


def task_resources(cluster: dict, placement: Placement) -> tuple[dict, dict]:
  """(Ray task options, environment variables) of one run, from the
  cluster's resources (``ray.cluster_resources()``)."""
  workers, env = placement.workers, {}
  gpus, tpus = cluster.get("GPU", 0), cluster.get("TPU", 0)
  if placement.gpus_per_run is not None and not gpus:
    raise ConfigError("--gpus-per-run: the Ray cluster has no GPU")
  if gpus:
    share = placement.gpus_per_run or 1.0
    if share < 1:   # several runs on one GPU: each preallocates only its share of its memory
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 * share:.3f}"
    return {"num_cpus": 1, "num_gpus": share}, env
  if tpus:
    return {"num_cpus": 1, "resources": {"TPU": max(1, int(tpus // workers))}}, env
  cores = max(1, int(cluster.get("CPU", 1) // workers))
  if cores == 1:
    env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                        " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
  return {"num_cpus": cores}, env


def start(out: Path, placement: Placement, log: Callable[[str], None]):
  """Ray, started in this process or joined at ``placement.address`` (or
  ``RAY_ADDRESS``) unless it runs already: ``(ray, started here,
  environment of the shared compilation cache in DIR/compile_cache)``."""
  ray = import_ray()
  cache = out / "compile_cache"
  rundir.make_dir(cache)
  started = not ray.is_initialized()
  if started:
    t0 = time.time()
    address = placement.address or os.environ.get("RAY_ADDRESS") or None
    logging.getLogger("ray").setLevel(logging.ERROR)   # its notes at start; errors still shown
    with warnings.catch_warnings():   # Ray forks and execs its processes: JAX's fork warning
      warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
      # "local": a Ray of this process's own, even where `ray start` left a cluster running here
      ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
               logging_level=logging.ERROR, configure_logging=False,
               **({} if address else {"num_cpus": os.cpu_count()}))
    log(f"[sweep] Ray {'at ' + address if address else 'started in this process'} in "
        f"{time.time() - t0:.1f} s: {_resources(ray.cluster_resources())}")
  return ray, started, {"JAX_COMPILATION_CACHE_DIR": str(cache.resolve()),
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def slug(name: str) -> str:
  return name.replace("/", "_")


def run_task(cfg_dict: dict, run_dir: str, logs: str, resume: bool) -> dict:
  """One run, in a Ray worker: trained (or resumed from its newest
  checkpoint: a sweep resumed, or this task run again after its worker was
  lost) into ``run_dir``, its lines into ``logs``. Returns the summary's
  test metrics and wall time, ``{"error": ...}`` for a run that cannot
  finish, ``{"stopped": rounds}`` after a stop request."""
  from hsee_jax import config as config_lib
  from hsee_jax import train as train_lib
  from hsee_jax.data import DataError
  log_file = Path(logs)
  attempt = 1 + (log_file.read_text().count("[ray] attempt ") if log_file.exists() else 0)
  with open(log_file, "a", buffering=1) as f:
    f.write(f"[ray] attempt {attempt}: process {os.getpid()} on {socket.gethostname()}\n")
    run = rundir.RunDir(Path(run_dir))
    resumed = (resume or attempt > 1) and bool(run.checkpoint_rounds())
    try:
      summary = train_lib.train(config_lib.from_dict(cfg_dict), run.path, overwrite=True,
                                resume=resumed, log=lambda s: f.write(s + "\n"))
    except stopping.Stopped as e:
      return {"stopped": e.rounds_done, "attempt": attempt}
    except (DataError, ConfigError, rundir.RunError) as e:
      f.write(f"[ray] failed: {e}\n")
      return {"error": str(e), "attempt": attempt}
  return {"test": summary["test"], "wall_seconds": summary["wall_seconds"], "attempt": attempt,
          "resumed": resumed}


def clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def train_runs(runs: list, out: Path, *, placement: Placement, resume: bool = False,
               log: Callable[[str], None] = print, errors: dict | None = None) -> list[str]:
  """:func:`hsee_jax.sweep.train_runs` on Ray: the runs of ``runs`` not
  finished before, ``placement.workers`` at a time, batch by batch (a
  batch's programs are compiled once into the shared cache). Returns the
  failed runs' names; a stop signal cancels the runs in flight (each saves
  a checkpoint first) and raises :class:`stopping.Stopped`."""
  from hsee_jax.sweep import _done
  todo = [r for r in runs if not (resume and _done(out / r.name, r.cfg.rounds))]
  todo.sort(key=lambda r: r.batch)
  logs = out / "logs"
  rundir.make_dir(logs)
  ray, started, cache_env = start(out, placement, log)
  options, env = task_resources(ray.cluster_resources(), placement)
  env.update(cache_env)
  task = ray.remote(run_task).options(max_retries=RETRIES, retry_exceptions=False,
                                      runtime_env={"env_vars": env}, **options)
  log(f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} finished before; {len(todo)} to train, "
      f"{placement.workers} at a time, each with {_resources(options)}")
  failed, pending, done, t0 = [], {}, 0, time.time()
  queue, leaders, warm, offsets = list(todo), {}, set(), {}

  def ready_to_start(r) -> bool:
    """A batch's first run compiles its programs into the shared cache
    before the batch's other runs start (they then read them from disk)."""
    if r.batch in warm or r.batch not in leaders:
      return True
    if (out / leaders[r.batch] / "metrics.jsonl").exists():   # its first round is done
      warm.add(r.batch)
    return r.batch in warm

  with stopping.StopSignals(log=log) as stop:
    try:
      while queue or pending:
        for r in list(queue):
          if len(pending) >= placement.workers or stop.requested is not None:
            break
          if not ready_to_start(r):   # asked as each run is placed: a leader placed just now counts
            continue
          queue.remove(r)
          leaders.setdefault(r.batch, r.name)
          log_file = logs / f"{slug(r.name)}.log"
          offsets[r.name] = log_file.stat().st_size if log_file.exists() else 0
          ref = task.remote(r.cfg.to_dict(), str((out / r.name).resolve()),
                            str(log_file.resolve()), resume)
          pending[ref] = r
        if stop.requested is not None:
          break
        ready = ray.wait(list(pending), num_returns=1, timeout=1.0)[0] if pending else []
        for ref in ready:
          r = pending.pop(ref)
          warm.add(r.batch)
          done += 1
          try:
            result = ray.get(ref)
          except Exception as e:  # noqa: BLE001  (the worker lost more often than RETRIES)
            result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
          elapsed = time.time() - t0
          left = len(queue) + len(pending)
          progress = (f"{done}/{len(todo)} of this sweep's runs, {clock(elapsed)} elapsed"
                      + (f", about {clock(elapsed / done * left)} left" if left else ""))
          if "stopped" in result:   # its process was signalled by someone else: saved, resumable
            result = {**result, "error": f"stopped by a signal after round {result['stopped']} "
                                         f"(resume with: hsee sweep --resume {out})"}
          tries = result.get("attempt", 1) - 1
          again = f" (its worker was lost; run again {tries} time{'s' * (tries > 1)})" if tries else ""
          if "error" in result:
            failed.append(r.name)
            if errors is not None:
              errors[r.name] = result["error"]
            log(f"[sweep] {r.name} failed: {result['error']}{again} | {progress}")
          else:
            test = result["test"] or {}
            log(f"[sweep] {r.name} done: mean_exit_acc {test.get('mean_exit_acc', float('nan')):.4f}"
                f", mean_full_acc {test.get('mean_full_acc', float('nan')):.4f}, "
                f"{result['wall_seconds']:.1f} s{again} | {progress}")
      if stop.requested is not None:
        for ref, r in pending.items():
          _stop(ray, ref, logs / f"{slug(r.name)}.log", offsets[r.name], stop.requested)
        for ref, r in pending.items():
          try:
            result = ray.get(ref, timeout=300)
            rounds = result.get("stopped")
            log(f"[sweep] {r.name} stopped" + (f" after round {rounds}" if rounds else ""))
          except Exception:  # noqa: BLE001  (cancelled before it began, or lost)
            log(f"[sweep] {r.name} stopped")
        raise stopping.Stopped(stop.requested, 0, out, sweep=out, note=(
            f"stopped the {len(pending)} run(s) in flight, each at its newest checkpoint"))
    finally:
      if started:
        ray.shutdown()
  return failed


def _stop(ray, ref, log_file: Path, offset: int, signum: int) -> None:
  """Ask the run of task ``ref`` to stop after its round in flight: the
  signal itself to its process where it runs on this machine (it then
  saves a checkpoint, as ``hsee train`` does), else Ray's cancel (a
  KeyboardInterrupt in the task). Only an attempt logged after ``offset``
  (this sweep's) names the process."""
  try:
    with open(log_file, "rb") as f:
      f.seek(offset)
      text = f.read().decode(errors="replace")
    last = text.rsplit("[ray] attempt ", 1)[1].split("\n", 1)[0]
    pid, host = int(last.split("process ")[1].split()[0]), last.rsplit(" on ", 1)[1]
  except (OSError, IndexError, ValueError):
    pid = host = None
  if pid is not None and host == socket.gethostname():
    try:
      os.kill(pid, signum)
      return
    except ProcessLookupError:
      pass
  ray.cancel(ref)


def _resources(res: dict) -> str:
  parts = [f"{v:g} {k if k != 'num_cpus' else 'CPU'}".replace("num_gpus", "GPU")
           for k, v in res.items() if k in ("CPU", "GPU", "TPU", "num_cpus", "num_gpus")]
  parts += [f"{v:g} {k}" for k, v in res.get("resources", {}).items()]
  return ", ".join(parts) or "no resources"
