"""Sweeps: every point of a grid, for every seed, as an ordinary run.

    hsee sweep --config configs/X.py --grid lr=0.05,0.1 --grid exit_loss_weight=0.5,1.0 \\
        --seeds 0,1,2 --out DIR [--set ...]
    hsee sweep --resume DIR [--set rounds=N]

Each run is an ordinary run directory, ``DIR/<point>/seed<s>`` (``config.json``,
``metrics.jsonl``, ``summary.json``, checkpoints), which ``hsee eval`` and
``hsee train --resume`` understand; ``DIR/sweep.json`` is the plan.

Runs are grouped into *batches*: runs whose configs differ only in fields the
compiled programs take as inputs (seed, learning rate and schedule,
momentum, weight decay, exit-loss weight, rounds, the partition, ...) form
one batch. The runs of a batch share one set of compiled programs
(``strategies.cached_program``): the first run compiles, the others reuse
it; runs train one after another. A field that changes array shapes or
program structure (width, cuts, batch size, dataset, strategy, ...) starts
another batch. A run that fails is recorded and the others go on.

Results: ``DIR/sweep.csv`` (one row per run: the swept fields, the seed, its
status (done / failed, with the error), ``mean_exit_acc`` and
``mean_full_acc`` over the fleet, ``exit_acc`` / ``full_acc`` per cut, wall time),
``DIR/sweep.md`` (per grid point, mean ± std over seeds and the
number of seeds) and ``DIR/sweep_<field>.png`` per swept field (accuracy
against the field, error bars over seeds).
"""
from __future__ import annotations

import ast
import collections
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from hsee_jax import config as config_lib
from hsee_jax import distributed, rundir
from hsee_jax.config import Config, ConfigError

# Fields the compiled programs take as inputs (declared in
# ``config.INPUT_FIELDS``): runs differing only in these share a batch (and
# its compilations).
INPUT_FIELDS = frozenset(config_lib.INPUT_FIELDS)
PLAN = "sweep.json"
STOPPED_EARLY = "stopped_early.json"   # written by hsee_jax.tune: runs ASHA stopped


@dataclasses.dataclass(frozen=True)
class Run:
  name: str          # "<point>/seed<s>"
  point: dict        # swept field -> value
  seed: int
  cfg: Config
  batch: int


def parse_grid(specs: list[str]) -> dict[str, list]:
  """``["lr=0.05,0.1", "cuts=(3,5,7),(5,5,5)", "strategy=averaging,sequential"]``
  -> field -> values (Python literals, else bare strings)."""
  grid: dict[str, list] = {}
  known = {f.name for f in dataclasses.fields(Config)}
  for spec in specs:
    if "=" not in spec:
      raise ConfigError(f"--grid {spec!r}: expected field=value,value,...")
    field, raw = (x.strip() for x in spec.split("=", 1))
    if field not in known:
      raise ConfigError(f"--grid {spec!r}: unknown config field {field!r}"
                        f"{config_lib.did_you_mean(field, known)}")
    if field == "seed":
      raise ConfigError("--grid seed=...: give seeds with --seeds")
    if field in grid:
      raise ConfigError(f"--grid {field}: given twice")
    try:
      values = list(ast.literal_eval(f"[{raw}]"))
    except (ValueError, SyntaxError):
      values = [v.strip() for v in raw.split(",")]
    values = [config_lib._tuples(v) for v in values]
    if not values or len({repr(v) for v in values}) != len(values):
      raise ConfigError(f"--grid {field}: need distinct values, got {raw!r}")
    grid[field] = values
  return grid


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--seeds {text!r}: expected integers, e.g. 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(f"--seeds {text!r}: need distinct seeds")
  return seeds


def _slug(v) -> str:
  text = ",".join(map(_slug, v)) if isinstance(v, tuple) else str(v)
  return re.sub(r"[^A-Za-z0-9.,_+-]", "_", text)


def batch_key(cfg: Config) -> tuple:
  """What a batch shares: every field that is not a program input."""
  return tuple((f.name, repr(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)
               if f.name not in INPUT_FIELDS)


NAME_LIMIT = 120  # characters of a point's folder name (file systems allow 255 bytes)


def point_names(points: list[dict]) -> list[str]:
  """A folder name per grid point, distinct for distinct points by construction.

  The readable name is ``field=value,...`` with every character a folder name
  should not hold replaced by ``_``. Points whose readable names coincide
  (values that differ only in such characters, or only in letter case, which
  some file systems ignore) and names longer than :data:`NAME_LIMIT` get
  ``~`` and 8 hex digits of a hash of the point's values: no readable name
  holds ``~``, so a hashed name never meets a readable one.
  """
  readable = [",".join(f"{f}={_slug(v)}" for f, v in p.items()) or "base" for p in points]
  counts = collections.Counter(n.casefold() for n in readable)
  names = []
  for n, p in zip(readable, points):
    if counts[n.casefold()] > 1 or len(n) > NAME_LIMIT:
      digest = hashlib.sha256(repr(sorted((f, repr(v)) for f, v in p.items())).encode())
      n = f"{n[:NAME_LIMIT - 9]}~{digest.hexdigest()[:8]}"
    names.append(n)
  if len({n.casefold() for n in names}) != len(names):  # a hash collision: never seen
    raise ConfigError("grid: two points hash to the same run directory name; rename a value")
  return names


def grid_points(base: Config, grid: dict, log=None) -> list[tuple[str, dict, Config]]:
  """The product of the grid: (point name, swept values, config) per point;
  point names come from :func:`point_names`. A field of ``base`` that a
  point leaves without effect is set back to its default there
  (:func:`hsee_jax.config.at_point`), and ``log`` says so."""
  fields = list(grid)
  points = [dict(zip(fields, values)) for values in itertools.product(*(grid[f] for f in fields))]
  out = []
  for pname, point in zip(point_names(points), points):
    try:
      cfg, reset = config_lib.at_point(base, point)
    except ConfigError as e:
      raise ConfigError(f"grid point {pname}: {e}") from None
    if reset and log is not None:
      log(f"[sweep] {pname}: {', '.join(reset)} back to the default (no effect at this point)")
    out.append((pname, point, cfg))
  return out


def plan_points(points: list[tuple[str, dict, Config]], seeds: list[int]) -> list[Run]:
  """Every point x seed, ordered batch by batch (the runs of a batch together,
  so that they follow each other and share compilations)."""
  runs, batches = [], {}
  for pname, point, cfg in points:
    for s in seeds:
      try:
        run_cfg = dataclasses.replace(cfg, seed=s, name=f"{cfg.name}/{pname}/seed{s}")
      except ConfigError as e:
        raise ConfigError(f"{pname}, seed {s}: {e}") from None
      b = batches.setdefault(batch_key(run_cfg), len(batches))
      runs.append(Run(f"{pname}/seed{s}", point, s, run_cfg, b))
  return sorted(runs, key=lambda r: r.batch)


def plan(base: Config, grid: dict, seeds: list[int], log=None) -> list[Run]:
  """Every grid point x seed, ordered batch by batch."""
  return plan_points(grid_points(base, grid, log), seeds)


def _done(run_dir: Path, rounds: int) -> bool:
  """The run in ``run_dir`` finished all ``rounds`` rounds."""
  try:
    summary = rundir.read_summary(run_dir)
    return summary["test"] is not None and summary["rounds"] == rounds
  except (OSError, ValueError, KeyError, TypeError):
    return False


def run_sweep(base: Config, grid: dict, seeds: list[int], out: str | Path, *,
              resume: bool = False, overwrite: bool = False,
              log: Callable[[str], None] = print, launcher: Callable | None = None) -> list[dict]:
  """Train every run of a sweep and write its tables.

  Args:
    base: the config every run starts from.
    grid: field name -> list of values; the runs are their product, each
      trained for every seed of ``seeds``.
    out: the sweep directory (a run directory per run, ``sweep.csv``,
      ``sweep.md``, plots).
    resume: finish the unfinished runs of the plan already in ``out``.
    overwrite: start again in an ``out`` that holds a sweep.
    log: progress lines.
    launcher: what trains the runs, :func:`train_runs`'s signature (None:
      :func:`train_runs`, one after another in this process;
      ``hsee_jax.ray_sweep.train_runs``: as Ray tasks).
  Returns:
    One dict per run (the rows of ``sweep.csv``: grid point, seed,
    ``status``, ``mean_exit_acc``, ``mean_full_acc``, per-cut accuracies);
    empty on processes other than 0.
  Raises:
    ConfigError: a bad grid, or ``out`` holding a sweep without ``resume`` /
      ``overwrite``.
  """
  out = Path(out)
  runs = plan(base, grid, seeds, log)
  with locked(out, log):
    return _run_sweep(base, grid, seeds, out, runs, resume, overwrite, log,
                      launcher or train_runs)


@contextlib.contextmanager
def locked(out: Path, log: Callable[[str], None] = print):
  """The sweep directory ``out``, created and locked (``rundir.RunLock``)
  for as long as the sweep trains and writes in it: a second sweep into
  it, ``--overwrite`` or ``--resume`` included, stops with one line naming
  the holder. With several processes, process 0 holds the lock."""
  if not distributed.is_writer():
    yield
    return
  rundir.make_dir(out)
  with rundir.RunLock(out).acquire(log):
    yield


def _run_sweep(base, grid, seeds, out: Path, runs: list[Run], resume: bool, overwrite: bool,
               log, launcher: Callable) -> list[dict]:
  plan_file = out / PLAN
  if plan_file.exists() and not (resume or overwrite):
    raise ConfigError(f"{out} holds a sweep; resume it with: hsee sweep --resume {out} "
                      f"(or --overwrite to start again)")
  writer = distributed.is_writer()  # several processes: process 0 writes and reports
  log = distributed.writer_log(log)
  distributed.barrier("sweep-checked")  # every process has looked before process 0 writes
  text = json.dumps(
      {"config": base.to_dict(), "grid": {f: [config_lib._jsonable(v) for v in vs]
                                          for f, vs in grid.items()},
       "seeds": seeds, "runs": [{"name": r.name, "point": {k: config_lib._jsonable(v)
                                                            for k, v in r.point.items()},
                                 "seed": r.seed, "batch": r.batch} for r in runs]}, indent=2)
  # unless it is on disk as it is (a resume; one that raised the rounds writes them)
  if writer and not (resume and plan_file.exists() and plan_file.read_text() == text):
    rundir.write_atomic(plan_file, text)
  t0 = time.time()
  errors: dict = {}
  try:
    failed = launcher(runs, out, resume=resume, log=log, errors=errors)
  finally:  # a stop signal too: the finished runs' tables are written
    rows = collect(out, runs, errors) if writer else []   # the other processes return no rows
    if writer:
      write_results(out, grid, rows)
  log(f"[sweep] done: {len(runs)} runs in {time.time() - t0:.1f} s; results in "
      f"{out / 'sweep.csv'}, {out / 'sweep.md'}")
  if failed:
    raise rundir.RunError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); "
                          f"the others' results are in {out / 'sweep.md'}, the errors in "
                          f"{out / 'sweep.csv'}")
  return rows


def train_runs(runs: list[Run], out: Path, *, resume: bool = False, dataset=None,
               log: Callable[[str], None] = print,
               errors: dict | None = None) -> list[str]:
  """Train ``runs`` into ``out/<run name>``, batch by batch, one after
  another; with ``resume``, keep the finished ones and resume the others
  from their newest checkpoint.

  A run that fails (non-finite values, say) stops with its error in its
  ``metrics.jsonl``; a run that cannot start (its data missing, a config its
  dataset cannot serve) is recorded in ``errors`` (run name -> the one-line
  error); the others go on. Returns the failed runs' names. ``dataset``:
  one already loaded for every run (else each run loads its own)."""
  from hsee_jax import train as train_lib
  from hsee_jax.data import DataError
  n_batches = len({r.batch for r in runs})
  seeds = len({r.seed for r in runs})
  log(f"[sweep] {len(runs)} runs ({len(runs) // seeds} points x {seeds} seeds) in {n_batches} "
      f"batch(es); the runs of a batch share their compiled programs")
  todo = []
  for i, run in enumerate(runs):
    if resume and _done(out / run.name, run.cfg.rounds):
      log(f"[sweep] run {i + 1}/{len(runs)} {run.name}: finished before, kept")
    else:
      todo.append(run)
  distributed.barrier("sweep-planned")  # every process has read what is done
  todo.sort(key=lambda r: r.batch)  # stable: plan order within a batch
  done, failed = len(runs) - len(todo), []
  for j, r in enumerate(todo):
    run_dir = rundir.RunDir(out / r.name)
    resumed = resume and bool(run_dir.checkpoint_rounds())
    left = todo[j:]
    log(f"[sweep] batch {r.batch + 1}/{n_batches}: {r.name}" + (" (resumed)" if resumed else "")
        + f"; done {done}/{len(runs)} runs, left {len(left)} runs in "
          f"{len({x.batch for x in left})} batch(es)")
    try:
      summary = train_lib.train(r.cfg, run_dir.path, overwrite=True, resume=resumed,
                                log=lambda s, name=r.name: log(f"  [{name}] {s}"), dataset=dataset)
    except (DataError, ConfigError, rundir.RunError) as e:
      summary = rundir.RunError(str(e))
    done += 1
    if isinstance(summary, rundir.RunError):
      failed.append(r.name)
      if errors is not None:
        errors[r.name] = str(summary)
      log(f"[sweep] run {done}/{len(runs)} {r.name} failed: {summary}")
      continue
    test = summary["test"] or {}
    log(f"[sweep] run {done}/{len(runs)} {r.name} done: mean_exit_acc "
        f"{test.get('mean_exit_acc', float('nan')):.4f}, mean_full_acc "
        f"{test.get('mean_full_acc', float('nan')):.4f}, {summary['wall_seconds']:.1f} s")
  return failed


def resume_sweep(out: str | Path, log: Callable[[str], None] = print,
                 overrides: list[str] = (), launcher: Callable | None = None) -> list[dict]:
  """Finish every unfinished run of the sweep in ``out``, exactly (each run
  resumes from its newest checkpoint). ``overrides`` (``--set``) may raise
  ``rounds`` only: every run is extended to that many rounds, as ``hsee
  train --resume --set rounds=N`` extends one (the plan records it)."""
  out = Path(out)
  try:
    saved = json.loads((out / PLAN).read_text())
  except OSError:
    raise ConfigError(f"--resume: {out} holds no sweep (no {PLAN})") from None
  except ValueError as e:  # not JSON, not UTF-8
    raise ConfigError(f"--resume: {out / PLAN} is damaged ({e})") from None
  try:
    base = config_lib.from_dict(saved["config"])
    grid = {f: [config_lib._tuples(v) for v in vs] for f, vs in saved["grid"].items()}
    seeds = [int(s) for s in saved["seeds"]]
  except ConfigError as e:
    raise ConfigError(f"--resume: {out / PLAN} is damaged (its config: {e})") from None
  except (TypeError, KeyError, AttributeError, ValueError):
    raise ConfigError(f"--resume: {out / PLAN} is damaged (not a sweep plan: it needs "
                      f"\"config\", \"grid\" and \"seeds\")") from None
  new = config_lib.override(base, list(overrides))
  changed = [f.name for f in dataclasses.fields(Config)
             if getattr(new, f.name) != getattr(base, f.name)]
  if [f for f in changed if f != "rounds"]:
    raise ConfigError(f"sweep --resume: --set {', '.join(f for f in changed if f != 'rounds')}: "
                      f"only rounds=N (extending every run) may change; the plan fixes the rest")
  if changed:
    if "rounds" in grid:
      raise ConfigError("sweep --resume --set rounds=N: rounds is swept in this sweep's grid; "
                        "it cannot be set for every run")
    if new.rounds < base.rounds:
      raise ConfigError(f"sweep --resume --set rounds={new.rounds}: the sweep's runs have "
                        f"{base.rounds} rounds; give rounds >= {base.rounds}")
    log(f"[sweep] extending every run of {out} from {base.rounds} to {new.rounds} rounds")
  return run_sweep(new, grid, seeds, out, resume=True, log=log, launcher=launcher)


def collect(out: Path, runs: list[Run], errors: dict | None = None) -> list[dict]:
  """One row per run from its ``summary.json``; a run without one is
  ``failed``, with the error its ``metrics.jsonl`` ends on, else its entry
  in ``errors``, else "did not finish"."""
  errors = errors or {}
  try:   # the runs Ray Tune's ASHA stopped (hsee_jax.tune), with their last rounds
    stopped = json.loads((out / STOPPED_EARLY).read_text())
  except (OSError, ValueError):
    stopped = {}
  rows = []
  for run in runs:
    row = {"run": run.name, **{f: _cell(v) for f, v in run.point.items()}, "seed": run.seed,
           "batch": run.batch}
    if run.name in stopped and not _done(out / run.name, run.cfg.rounds):
      rows.append({**row, "status": "stopped early", "stopped_after_round": stopped[run.name]})
      continue
    if not _done(out / run.name, run.cfg.rounds):
      try:
        records = rundir.RunDir(out / run.name).read_records(lambda s: None)
      except rundir.RunError as e:   # the run's history is damaged: say so in its row
        records = [{"event": "stopped", "error": str(e)}]
      error = next((r.get("error") for r in reversed(records) if r.get("event") == "stopped"),
                   None) or errors.get(run.name, "did not finish")
      rows.append({**row, "status": "failed", "error": error})
      continue
    summary = rundir.read_summary(out / run.name)
    test = summary["test"]
    row.update({"status": "done", "mean_exit_acc": test["mean_exit_acc"],
                "mean_full_acc": test["mean_full_acc"]})
    for c in test["cuts"]:
      row[f"exit_acc_cut{c['cut']}"] = c["exit_acc"]["mean"]
      row[f"full_acc_cut{c['cut']}"] = c["full_acc"]["mean"]
    row["wall_seconds"] = summary["wall_seconds"]
    rows.append(row)
  return rows


def _cell(v):
  return " ".join(map(str, v)) if isinstance(v, tuple) else v


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; nan for one value)."""
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def summarise(grid: dict, rows: list[dict]) -> list[dict]:
  """Per grid point: mean ± std over seeds of every accuracy column."""
  fields = list(grid)
  metrics = list(dict.fromkeys(k for r in rows for k in r if k.endswith("_acc") or "_acc_cut" in k))
  points: dict = {}
  for r in rows:
    if r.get("status", "done") == "done":
      points.setdefault(tuple(r[f] for f in fields), []).append(r)
  out = []
  for key, rs in points.items():
    entry = {**dict(zip(fields, key)), "seeds": len(rs)}
    for m in metrics:
      vals = [r[m] for r in rs if r.get(m) not in (None, "")]
      if vals:
        entry[m] = mean_std(vals)
    out.append(entry)
  return out


def _fmt(ms) -> str:
  mean, std = ms
  return f"{mean:.4f} ± {std:.4f}" if np.isfinite(std) else f"{mean:.4f} (1 seed)"


def write_results(out: Path, grid: dict, rows: list[dict]) -> None:
  """``sweep.csv``, ``sweep.md`` (each whole or not at all: a failed write is
  a one-line ``RunError`` and leaves the file as it was) and the plots."""
  cols = list(dict.fromkeys(k for r in rows for k in r))
  text = io.StringIO()
  w = csv.DictWriter(text, fieldnames=cols)
  w.writeheader()
  w.writerows(rows)
  rundir.write_atomic(out / "sweep.csv", text.getvalue())
  points = summarise(grid, rows)
  failed = [r for r in rows if r.get("status") == "failed"]
  early = [r for r in rows if r.get("status") == "stopped early"]
  stopped_text = ", ".join(f"{r['run']} (after round {r['stopped_after_round']})" for r in early)
  fields = list(grid)
  metrics = list(dict.fromkeys(k for p in points for k in p if k not in fields and k != "seeds"))
  md = ["# Sweep results", "",
        f"{len(rows)} runs; per grid point the mean ± sample standard deviation over seeds "
        f"of the final test accuracies (exit = the client's exit head, server = the full "
        f"path through the server part; means over the fleet and per cut)."
        + (f" Failed, left out: {', '.join(r['run'] for r in failed)} (errors in sweep.csv)."
           if failed else "")
        + (f" Stopped early by ASHA, left out: {stopped_text}." if early else ""), "",
        "| " + " | ".join(fields + ["seeds"] + metrics) + " |",
        "| " + " | ".join("---" for _ in fields + ["seeds"] + metrics) + " |"]
  for p in points:
    md.append("| " + " | ".join([str(p[f]) for f in fields] + [str(p["seeds"])]
                                + [_fmt(p[m]) if m in p else "" for m in metrics]) + " |")
  rundir.write_atomic(out / "sweep.md", "\n".join(md) + "\n")
  if points:
    try:
      _plots(out, grid, points)
    except OSError as e:
      raise rundir.RunError(f"cannot write the plots in {out}: {e.strerror or e}; "
                            f"sweep.csv and sweep.md are written") from None


def _plots(out: Path, grid: dict, points: list[dict]) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  for field in grid:
    others = [f for f in grid if f != field]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    series: dict = {}
    for p in points:
      series.setdefault(tuple(p[f] for f in others), []).append(p)
    numeric = all(isinstance(p[field], (int, float)) for p in points)
    for key, ps in series.items():
      xs = [p[field] for p in ps]
      pos = xs if numeric else list(range(len(xs)))
      label = ", ".join(f"{f}={v}" for f, v in zip(others, key))
      for metric, style in (("mean_full_acc", "-o"), ("mean_exit_acc", "--s")):
        ys = [p[metric][0] for p in ps]
        err = [p[metric][1] if np.isfinite(p[metric][1]) else 0.0 for p in ps]
        ax.errorbar(pos, ys, yerr=err, fmt=style, capsize=3,
                    label=f"{'full path' if 'full' in metric else 'exit'}"
                          + (f" ({label})" if label else ""))
      if not numeric:
        ax.set_xticks(pos, [str(x) for x in xs])
    ax.set_xlabel(field)
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"sweep_{field}.png", dpi=110)
    plt.close(fig)
