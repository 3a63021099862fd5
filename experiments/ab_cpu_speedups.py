"""A/B measurements behind two CPU speed-ups, written to ab.json.

    python experiments/ab_cpu_speedups.py --out runs/ab_cpu_speedups

* tree helpers: slicing one client out of a stacked client state and stacking
  K states, eagerly (one dispatch per leaf) against the jitted helpers of
  ``hsee_jax.engine`` (one dispatch per tree);
* ``models.materialize``: Averaging rounds with it and with it replaced by the
  identity, built in one process and interleaved round by round (the order
  alternates), for each ``--modes`` execution; also the largest difference
  between the two final states (dividing by 1.0 is exact, but XLA may fuse,
  and so round, the surrounding ops differently).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_throughput import JaxExecution  # noqa: E402
from hsee_jax import engine, models, strategies  # noqa: E402


def _ms(fn, reps=20):
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(reps):
    r = fn()
  jax.block_until_ready(r)
  return (time.perf_counter() - t0) / reps * 1e3


def tree_helpers(args) -> dict:
  run = JaxExecution("loop", args.k, args)
  cut = min(run.strategy.fleet.groups)
  k = len(run.strategy.fleet.groups[cut])
  part = strategies._stack_copies(strategies.client_server_parts(run.state, cut, run.strategy.ctx.tx), k)
  parts = [engine.tree_slice(part, i) for i in range(k)]
  return {"leaves": len(jax.tree.leaves(part)), "clients": k,
          "slice_eager_ms": _ms(lambda: engine.tree_slice.__wrapped__(part, 1)),
          "slice_jit_ms": _ms(lambda: engine.tree_slice(part, 1)),
          "stack_eager_ms": _ms(lambda: engine.tree_stack.__wrapped__(parts)),
          "stack_jit_ms": _ms(lambda: engine.tree_stack(parts))}


def materialize_ab(mode: str, args) -> dict:
  real = models.materialize
  runs = {}
  try:
    for on in (False, True):  # the choice is read while tracing, i.e. in the first round
      models.materialize = real if on else (lambda x: x)
      runs[on] = JaxExecution(mode, args.k, args)
      runs[on].round()
  finally:
    models.materialize = real
  times = {False: [], True: []}
  for rep in range(args.reps):
    for on in ((False, True) if rep % 2 == 0 else (True, False)):
      t0 = time.perf_counter()
      runs[on].round()
      times[on].append(time.perf_counter() - t0)
  images = args.k * args.steps * args.batch
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))),
      runs[False].state, runs[True].state))
  return {"mode": mode, "clients": args.k,
          "images_per_s_without": images / statistics.median(times[False]),
          "images_per_s_with": images / statistics.median(times[True]),
          "round_seconds_without": times[False], "round_seconds_with": times[True],
          "states_max_abs_difference": max(diffs)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--k", type=int, default=8, help="clients (cuts spread over 3, 5, 7)")
  p.add_argument("--width", type=float, default=0.25)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--reps", type=int, default=4)
  p.add_argument("--modes", default="unrolled,loop")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = {"jax": jax.__version__, "backend": jax.default_backend(), "args": vars(args),
            "tree_helpers": tree_helpers(args),
            "materialize": [materialize_ab(m, args) for m in args.modes.split(",")]}
  (out / "ab.json").write_text(json.dumps(result, indent=2))
  t = result["tree_helpers"]
  print(f"[ab] tree_slice {t['slice_eager_ms']:.2f} -> {t['slice_jit_ms']:.2f} ms, "
        f"tree_stack of {t['clients']} {t['stack_eager_ms']:.2f} -> {t['stack_jit_ms']:.2f} ms "
        f"({t['leaves']} leaves)")
  for r in result["materialize"]:
    print(f"[ab] materialize, {r['mode']} K={r['clients']}: {r['images_per_s_without']:.0f} -> "
          f"{r['images_per_s_with']:.0f} images/s, states differ by at most {r['states_max_abs_difference']:.2g}")
  print(f"[ab] wrote {out}/ab.json")


if __name__ == "__main__":
  main()
