"""R seeds of one config: as R processes, and as one sweep.

    python experiments/bench_sweep.py --out runs/bench_sweep --runs 1,2,4,8

For each R in --runs, as child processes of this script, one after another:
  separate  ``hsee train --config CONFIG --set seed=s`` for each of R seeds, one
            process after the other (each starts, loads and compiles for itself)
  sweep     ``hsee sweep --seeds 0..R-1``: one process; the runs train
            one after another and share their compiled programs
  workersN  ``hsee sweep --seeds 0..R-1 --workers N`` (``--modes ...,workers2``):
            N runs at a time as Ray tasks (hsee_jax.ray_sweep; the extra
            ``.[ray]``), sharing JAX's persistent compilation cache; also
            the Ray start-up seconds and each run's first round (which
            compiles, or reads the programs from the shared cache)
            (``--gpus-per-run F`` is passed on: 4 runs on one GPU at 0.25)
Per (R, mode): wall seconds including start-up, loading and compilation; images/s
of training (all images trained / the training rounds' seconds; each run's
first round, which compiles, left out); the
peak RSS of the child process(es); the ratio to ``separate``; and whether every
run's metrics equal those of the first mode (they must: same config, same
seed). Writes bench_sweep.json, bench_sweep.csv and
bench_sweep.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_io  # noqa: E402
MODES = ("separate", "sweep")
VOLATILE = ("seconds", "images_per_s")


def _hsee(args: list[str], log: Path) -> tuple[float, float]:
  """Run ``python -m hsee_jax ARGS``; (wall seconds, peak RSS in MB) of that process."""
  t0 = time.perf_counter()
  with open(log, "w") as f:
    p = subprocess.Popen([sys.executable, "-m", "hsee_jax", *args], cwd=ROOT, stdout=f,
                         stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  if p.returncode != 0:
    raise RuntimeError(f"hsee {' '.join(args)} failed (exit {p.returncode}):\n"
                       f"{log.read_text()[-3000:]}")
  return wall, usage.ru_maxrss / 1024


def _records(run_dir: Path) -> list[dict]:
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _training(run_dirs: list[Path]) -> tuple[int, float]:
  """(images trained, seconds of training) over runs, each run's first round
  (which compiles) left out."""
  images = seconds = 0.0
  for d in run_dirs:
    for r in _records(d)[1:]:
      images += r["images_per_s"] * r["seconds"]
      seconds += r["seconds"]
  return int(round(images)), seconds


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--config", default="configs/smoke.py")
  p.add_argument("--runs", default="1,2,4,8", help="numbers of seeds R")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--gpus-per-run", help="passed to the workersN modes")
  args = p.parse_args(argv)
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  modes = args.modes.split(",")
  sets = [x for o in args.overrides for x in ("--set", o)]
  rows = []
  for n in map(int, args.runs.split(",")):
    seeds = list(range(n))
    ref = None
    for mode in modes:
      where = out / f"r{n}" / mode
      if mode == "separate":
        walls, rss = zip(*[_hsee(["train", "--config", args.config, *sets, "--set", f"seed={s}",
                                  "--out", str(where / "base" / f"seed{s}"), "--overwrite"],
                                 out / f"r{n}_{mode}_seed{s}.log") for s in seeds])
        wall, peak = sum(walls), max(rss)
      else:
        ray = ([] if mode == "sweep" else ["--workers", mode.removeprefix("workers")]
               + (["--gpus-per-run", args.gpus_per_run] if args.gpus_per_run else []))
        wall, peak = _hsee(["sweep", "--config", args.config, *sets,
                            "--seeds", ",".join(map(str, seeds)), "--out", str(where),
                            "--overwrite", *ray],
                           out / f"r{n}_{mode}.log")
      dirs = [where / "base" / f"seed{s}" for s in seeds]
      metrics = [[{k: v for k, v in r.items() if k not in VOLATILE} for r in _records(d)]
                 for d in dirs]
      ref = metrics if ref is None else ref  # the first mode's
      images, seconds = _training(dirs)
      row = {"runs": n, "mode": mode, "wall_s": round(wall, 1), "train_images_per_s":
             round(images / seconds, 1), "peak_rss_mb": round(peak), "metrics_identical":
             metrics == ref,
             "first_round_s": [round(_records(d)[0]["seconds"], 2) for d in dirs]}
      if mode.startswith("workers"):
        text = (out / f"r{n}_{mode}.log").read_text()
        started = [l for l in text.splitlines() if l.startswith("[sweep] Ray ")]
        row["ray_start_s"] = float(re.search(r" in ([0-9.]+) s", started[0]).group(1)) if started else None
      rows.append(row)
      print(f"[bench_sweep] R={n} {mode:>8}: {wall:7.1f} s, {row['train_images_per_s']:.0f} img/s "
            f"training, peak RSS {peak:.0f} MB, metrics identical: {row['metrics_identical']}",
            flush=True)
    base = next((r["wall_s"] for r in rows if r["runs"] == n and r["mode"] == "separate"), None)
    for r in rows:
      if r["runs"] == n:
        r["wall_vs_separate"] = round(r["wall_s"] / base, 3) if base else None
  import jax
  result = {"config": args.config, "overrides": args.overrides, "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "rows": rows}
  bench_io.write_tables(out, "bench_sweep", result, rows)
  if not bench_io.line_plot(out / "bench_sweep.png", rows, "mode", "runs", "wall_s",
                            xlabel="runs (seeds) R", ylabel="wall seconds",
                            title=f"{args.config} {' '.join(args.overrides)}"):
    print("[bench_sweep] matplotlib not installed: no plot")
  for r in rows:
    if r["mode"] != "separate" and r["wall_vs_separate"]:
      print(f"[bench_sweep] R={r['runs']} {r['mode']}: {r['wall_vs_separate']:.2f} x the wall "
            f"time of {r['runs']} separate processes")
  print(f"[bench_sweep] wrote {out}/bench_sweep.json, bench_sweep.csv, bench_sweep.png")


if __name__ == "__main__":
  main()
