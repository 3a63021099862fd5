"""Does a long run's memory stay flat over rounds? A tiny run of many rounds
through the whole driver (``train.train``: evaluation, metrics.jsonl,
checkpoints, the writers), with the process's resident memory after every
round, the live Python objects and JAX arrays every 10 rounds and, with ``--trace``, what Python allocated between a fifth of the
way in and the end (``tracemalloc``, by source line).

    python experiments/bench_memory.py --out runs/bench_memory --rounds 500 --trace

Writes bench_memory.json: the resident memory per round (MiB), the slope
over the second half of the rounds (KiB per round, a least-squares fit),
the objects and arrays alive (after a collection) and the Python
allocations that grew most. The reference is the run itself:
its first rounds against its last.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax import writers as writers_lib  # noqa: E402
from hsee_jax.config import Config  # noqa: E402

CONFIG = Config(dataset="synthetic", synthetic_shape=(8, 8, 4, 64, 32), width=0.125,
                cuts=(2, 4, 6), batch_size=8, local_steps=1, eval_every=1, eval_batch_size=32,
                checkpoint_every=100, exit_thresholds=(0.0, 0.5, 1.0), schedule="constant")


def rss_mib() -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  return float("nan")


class Probe:
  """A writer that notes the resident memory after each round (and takes
  the tracemalloc snapshots)."""

  def __init__(self, rounds: int, trace: bool):
    self.rss, self.rounds, self.trace, self.snapshots = [], rounds, trace, {}
    self.alive = []   # (round, Python objects, JAX arrays) every 10 rounds

  def begin(self, cfg, records):
    pass

  def write_round(self, record):
    self.rss.append(rss_mib())
    done = record["round"] + 1
    if done % 10 == 0:
      gc.collect()
      self.alive.append((done, len(gc.get_objects()), len(jax.live_arrays())))
    if self.trace and done in (self.rounds // 5, self.rounds):
      self.snapshots[done] = tracemalloc.take_snapshot()

  def close(self):
    pass


def slope_kib(rss: list[float]) -> float:
  """KiB per round over the second half (least squares)."""
  half = np.asarray(rss[len(rss) // 2:])
  return float(np.polyfit(np.arange(len(half)), half, 1)[0] * 1024)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--rounds", type=int, default=500)
  p.add_argument("--trace", action="store_true", help="tracemalloc: what Python allocated")
  args = p.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cfg = dataclasses.replace(CONFIG, rounds=args.rounds)
  probe = Probe(args.rounds, args.trace)
  original = writers_lib.for_config
  train_lib.writers_lib.for_config = lambda *a, **k: original(*a, **k) + [probe]
  if args.trace:
    tracemalloc.start(8)
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    train_lib.train(cfg, Path(tmp) / "run", log=lambda s: None)
  grew = []
  if args.trace:
    a, b = probe.snapshots[args.rounds // 5], probe.snapshots[args.rounds]
    for stat in b.compare_to(a, "traceback")[:8]:
      frames = [f"{f.filename.split('site-packages/')[-1].split('hsee_jax/')[-1]}:{f.lineno}"
                for f in reversed(stat.traceback)][:5]   # the newest frame first
      grew.append({"kib": stat.size_diff / 1024, "count": stat.count_diff, "where": frames})
  result = {"config": cfg.to_dict(), "rounds": args.rounds, "seconds": time.time() - t0,
            "rss_mib_first": probe.rss[0], "rss_mib_last": probe.rss[-1],
            "rss_slope_kib_per_round_second_half": slope_kib(probe.rss),
            "python_growth_between_rounds": [args.rounds // 5, args.rounds] if args.trace else None,
            "python_growth_top": grew, "alive_round_objects_arrays": probe.alive,
            "rss_mib": probe.rss}
  (out / "bench_memory.json").write_text(json.dumps(result, indent=1))
  print(f"rounds {args.rounds}: rss {probe.rss[0]:.1f} -> {probe.rss[-1]:.1f} MiB, second half "
        f"{result['rss_slope_kib_per_round_second_half']:.1f} KiB/round; {result['seconds']:.0f} s")
  (r0, o0, a0), (r1, o1, a1) = probe.alive[len(probe.alive) // 5], probe.alive[-1]
  print(f"alive after round {r0}: {o0} objects, {a0} arrays; after round {r1}: {o1} objects, "
        f"{a1} arrays")
  for g in grew[:5]:
    print(f"  +{g['kib']:.1f} KiB ({g['count']:+d} blocks) {' <- '.join(g['where'])}")


if __name__ == "__main__":
  main()
