"""A sweep in one process against the same runs as separate processes.

    python experiments/bench_sweep.py --out runs/bench_sweep --seeds 0,1,2,3

(a) ``hsee sweep --config CONFIG --seeds ... --out A`` (one process; the runs
share their compiled programs); (b) ``hsee train --config CONFIG --set seed=s
--out B/s`` for each seed, one process after the other (each compiles for
itself), the way runs were made before ``hsee sweep``. Both as child
processes of this script, (b) then (a). Writes bench_sweep.json and
bench_sweep.csv: wall seconds of each, their ratio, and whether every run's
metrics agree between (a) and (b) (they must: same config, same seed).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hsee(args: list[str]) -> float:
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "hsee_jax", *args], cwd=ROOT, capture_output=True,
                     text=True)
  if r.returncode != 0:
    raise RuntimeError(f"hsee {' '.join(args)} failed:\n{r.stderr[-3000:]}")
  return time.perf_counter() - t0


def _metrics(run_dir: Path) -> list[dict]:
  recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in recs]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--config", default="configs/smoke.py")
  p.add_argument("--seeds", default="0,1,2,3")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  args = p.parse_args(argv)
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  sets = [x for o in args.overrides for x in ("--set", o)]
  separate = sum(_hsee(["train", "--config", args.config, *sets, "--set", f"seed={s}",
                        "--out", str(out / "separate" / f"seed{s}"), "--overwrite"])
                 for s in seeds)
  swept = _hsee(["sweep", "--config", args.config, *sets, "--seeds", args.seeds,
                 "--out", str(out / "sweep"), "--overwrite"])
  same = all(_metrics(out / "sweep" / "base" / f"seed{s}") == _metrics(out / "separate" / f"seed{s}")
             for s in seeds)
  row = {"config": args.config, "overrides": " ".join(args.overrides), "runs": len(seeds),
         "separate_processes_s": round(separate, 1), "one_sweep_s": round(swept, 1),
         "speedup": round(separate / swept, 2), "metrics_identical": same}
  (out / "bench_sweep.json").write_text(json.dumps(row, indent=2))
  with open(out / "bench_sweep.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(row))
    w.writeheader()
    w.writerow(row)
  print(f"[bench_sweep] {len(seeds)} runs of {args.config}: {separate:.1f} s as separate "
        f"processes, {swept:.1f} s as one sweep ({separate / swept:.2f}x); metrics identical: "
        f"{same}")


if __name__ == "__main__":
  main()
