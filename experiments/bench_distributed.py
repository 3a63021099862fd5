"""One process with 2 devices against 2 processes with 1 device each.

    python experiments/bench_distributed.py --out runs/bench_distributed

Both setups train the same config (``configs/smoke.py`` on synthetic data of
its size, Averaging with 6 clients at cuts 3, 3, 5, 5, 7, 7, ``shard_clients``
in chunks of 2: each chunk's client axis over the 2 devices), as child
processes of this script, one after the other:

  one_process    ``hsee train`` with 2 forced CPU devices
  two_processes  ``hsee train --distributed`` twice, one CPU device each, joined
                 by ``jax.distributed`` over 127.0.0.1 (collectives: gloo)

Per setup: wall seconds of the command; seconds per round (the median of the
rounds after the first, which compiles); and the cross-layer aggregation's
collective timed alone: a sum over the client axis of a [2, P] float32 array
laid over the two devices, P the parameter count of the whole network (the
size of what a chunk sums for the average), median of --reps calls. Ratios
two_processes / one_process. Writes bench_distributed.json and .csv into --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_io  # noqa: E402

from hsee_jax import distributed, rundir  # noqa: E402

SETTINGS = ["dataset=synthetic", "synthetic_shape=(32,32,10,3000,1000)", "cuts=(3,3,5,5,7,7)",
            "shard_clients=True", "mode=vmap", "client_chunk=2"]

COLLECTIVE = r'''
import json, statistics, sys, time
import numpy as np
coord, n, pid, reps, cfg_args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
from hsee_jax import distributed
if n > 1:
  distributed.initialize(coord, n, pid, 120)
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hsee_jax import config as config_lib, train as train_lib
from hsee_jax import models
cfg = config_lib.load(cfg_args[0], cfg_args[1:])
import dataclasses
cfg = dataclasses.replace(cfg, shard_clients=False)
_, sim = train_lib.build(cfg)
shapes = jax.eval_shape(lambda k: sim.net.init_span(k, *sim.net.full_span(), sim.ctx.image_shape)[0],
                        jax.random.PRNGKey(0))
size = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
mesh = Mesh(np.asarray(jax.devices()), ("clients",))
host = np.ones((2, size), np.float32)
x = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("clients")), lambda i: host[i])
f = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P()))
f(x).block_until_ready()
times = []
for _ in range(reps):
  t0 = time.perf_counter()
  f(x).block_until_ready()
  times.append(time.perf_counter() - t0)
if jax.process_index() == 0:
  print("RESULT " + json.dumps({"params": size, "seconds": statistics.median(times)}))
'''




def _run(commands: list[list[str]], devices: int, logs: list[Path]) -> tuple[float, str]:
  """Start every command at once; (wall seconds, output of the first)."""
  t0 = time.perf_counter()
  procs = [subprocess.Popen(c, env=distributed.cpu_env(devices), cwd=ROOT,
                            stdout=open(l, "w"), stderr=subprocess.STDOUT)
           for c, l in zip(commands, logs)]
  try:
    for p in procs:
      p.wait(timeout=1800)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  wall = time.perf_counter() - t0
  if any(p.returncode != 0 for p in procs):
    raise SystemExit(f"bench_distributed: a child failed; see {', '.join(map(str, logs))}")
  return wall, logs[0].read_text()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--config", default=str(ROOT / "configs" / "smoke.py"))
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  overrides = [*SETTINGS, f"rounds={args.rounds}"]
  cfg_flags = ["--config", args.config] + [a for o in overrides for a in ("--set", o)]
  rows = []
  for setup, n in (("one_process", 1), ("two_processes", 2)):
    port = distributed.free_port()
    dist = lambda i: (["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                       str(n), "--process-id", str(i)] if n > 1 else [])
    run = out / setup
    logs = [out / f"{setup}_train{i}.log" for i in range(n)]
    wall, _ = _run([[sys.executable, "-m", "hsee_jax", "train", *cfg_flags, "--out", str(run),
                     "--overwrite", *dist(i)] for i in range(n)], 2 // n, logs)
    records = rundir.RunDir(run).read_records()
    per_round = statistics.median(r["seconds"] for r in records[1:])
    port = distributed.free_port()
    _, text = _run([[sys.executable, "-c", COLLECTIVE, f"127.0.0.1:{port}", str(n), str(i),
                     str(args.reps), args.config, *overrides] for i in range(n)], 2 // n,
                   [out / f"{setup}_collective{i}.log" for i in range(n)])
    coll = json.loads(next(l for l in text.splitlines() if l.startswith("RESULT "))[7:])
    rows.append({"setup": setup, "processes": n, "devices_per_process": 2 // n,
                 "wall_s": round(wall, 1), "seconds_per_round": round(per_round, 3),
                 "aggregation_collective_ms": round(coll["seconds"] * 1e3, 3),
                 "params_summed": coll["params"],
                 "final_full_acc": records[-1]["test"]["mean_full_acc"]})
    print(f"[bench_distributed] {setup}: {wall:.1f} s, {per_round:.3f} s/round, aggregation "
          f"collective {coll['seconds'] * 1e3:.2f} ms ({coll['params']} params)", flush=True)
  one, two = rows
  ratios = {"seconds_per_round": two["seconds_per_round"] / one["seconds_per_round"],
            "aggregation_collective": (two["aggregation_collective_ms"]
                                       / one["aggregation_collective_ms"])}
  for r in rows:
    r["seconds_per_round_vs_one_process"] = round(r["seconds_per_round"]
                                                  / one["seconds_per_round"], 3)
    r["aggregation_vs_one_process"] = round(r["aggregation_collective_ms"]
                                            / one["aggregation_collective_ms"], 3)
  bench_io.write_tables(out, "bench_distributed", {"config": args.config,
                                                   "overrides": overrides, "rows": rows,
                                                   "ratios_two_over_one": ratios}, rows)
  print(f"[bench_distributed] two processes / one: {ratios['seconds_per_round']:.2f}x per round, "
        f"{ratios['aggregation_collective']:.2f}x the aggregation collective; wrote "
        f"{out / 'bench_distributed.json'}, .csv")
  return 0


if __name__ == "__main__":
  sys.exit(main())
