"""Fleet benchmark: round time, compilation, memory and checkpoint size against
fleet size N and cohort size C, with the PyTorch loop on the same cohort.

    python experiments/bench_fleet.py --out runs/bench_fleet
    python experiments/bench_fleet.py --out runs/bench_fleet --widths 0.125,0.25 \\
        --strategies averaging,sequential --ns 16,128,1024,10000 --cs 4,16,64

(a) C fixed (``--fixed-c``), N in ``--ns``; (b) N fixed (``--fixed-n``), C in
``--cs``; (c) with ``--chunks``, Averaging at N = ``--fixed-n`` and the
largest C of ``--cs`` for each client chunk and each mode of
``--chunk-modes`` (what ``client_chunk = 0`` and ``mode = auto`` are set
from); (d) with ``--iot``, Averaging at N = ``--fixed-n``, C = ``--fixed-c``
without and with device speeds drawn per client (:data:`IOT`),
their ratio of round times in ``iot_round_ratio``. Every point runs in its own process (so memory and compilation are
its own): synthetic 32x32 data (20,000 images for every N up to 10,000), cuts in
three tiers (3, 5, 7 on 50/30/20% of the fleet), IID partitions, client
optimiser state reset each round, no augmentation (the PyTorch reference does
none; ``--augment`` turns it on for hsee_jax), the default execution
(``mode=auto``, the default chunk) unless a sweep sets them. Measured:
seconds per round, the median of ``--rounds`` rounds that compiled nothing
new (no XLA compilation of any function in the round: sampled cohorts meet
new chunk sizes, so new compilations, in their first rounds); compilation, the time of all rounds run less that median per
round; images/s; ``peak_rss_mb``, the process's peak RSS including the
compiler's, and ``train_rss_mb``, the peak RSS during the rounds that
compiled nothing (VmHWM reset at the start of each round): the memory
training itself needs; the persistent state and the bytes of one orbax
checkpoint of it. (d) With torch installed, the PyTorch reference loop
(experiments/torch_reference.py) trains the same number of clients per
round, at the same cuts, steps and batch, in the same job: the yardstick.
Writes bench_fleet.json, bench_fleet.csv and bench_fleet.png to --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
TIERS = ((3, 0.5), (5, 0.3), (7, 0.2))
# One train set for every fleet size (2 images per client beyond it), so that
# round time and memory compare across N with the data held fixed.
TRAIN_IMAGES = 20_000
# (d) device speeds: each client's FLOP/s and bandwidth drawn lognormal around
# its tier's; the same clients train (everyone online, no deadline), so the
# ratio is what the speeds and the simulated clock cost per round
IOT = dict(client_flops_per_s=(2e9, 1e10, 5e10), client_link_bytes_per_s=(1e5, 1e6, 1e7),
           speed_spread=0.5)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def point(strategy: str, width: float, n: int, c: int, rounds: int, steps: int, batch: int,
          mode: str = "auto", chunk: int = 0, augment: bool = False,
          train_images: int = TRAIN_IMAGES, max_rounds: int = 40, iot: bool = False) -> dict:
  """One (strategy, width, N, C) point, in this process; ``iot``: with the
  fleet's device speeds drawn per client (:data:`IOT`)."""
  import jax

  from bench_throughput import _rss_peak_mb, _rss_reset
  from hsee_jax import train as train_lib
  from hsee_jax.checkpoint import Checkpointer, meta_for
  from hsee_jax.config import Config
  cfg = Config(dataset="synthetic", synthetic_shape=(32, 32, 10, max(train_images, 2 * n), 16),
               width=width, num_clients=n, cut_tiers=TIERS, clients_per_round=c,
               client_state="reset", strategy=strategy, local_steps=steps, batch_size=batch,
               rounds=1000, augment=augment, schedule="constant", mode=mode,
               client_chunk=chunk, **(IOT if iot else {}))
  _, sim = train_lib.build(cfg)
  key = jax.random.PRNGKey(1)
  state = jax.block_until_ready(sim.init_state(jax.random.PRNGKey(0)))
  # Sampled cohorts meet new chunk sizes (hence compilations) in their first
  # rounds: time ``rounds`` rounds that compiled nothing new (no XLA
  # compilation of any function: runners, prepare, aggregation, metrics);
  # compilation is the rest of the time.
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(secs) if event == BACKEND_COMPILE_EVENT else None)
  compiled = lambda: len(compiles)
  times, clean, clean_rss, round_rss = [], [], [], []
  rnd = 0
  while len(clean) < rounds and rnd < max_rounds:
    before = compiled()
    _rss_reset()
    t0 = time.perf_counter()
    state, metrics, _ = sim.run_round(state, rnd, key)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
    round_rss.append(_rss_peak_mb())
    if rnd > 0 and compiled() == before:
      clean.append(times[-1])
      clean_rss.append(round_rss[-1])
    rnd += 1
  state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
  with tempfile.TemporaryDirectory() as d:
    with Checkpointer(Path(d) / "ck", keep=1) as ck:
      ck.save(1, state, meta_for(cfg, 1, key))
      ck.finish(1)
    ckpt_bytes = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
  later = statistics.median(clean or times[-1:])  # (no clean round: the last one, flagged)
  return {"system": "hsee_jax", "strategy": strategy, "width": width, "num_clients": n,
          "clients_per_round": c, "mode": sim.ctx.mode, "chunk": sim.ctx.chunk, "iot": iot,
          "first_round_s": times[0], "round_s": later,
          "compile_s": sum(times) - later * len(times), "rounds_run": len(times),
          "clean_rounds": len(clean),
          "images_per_s": c * steps * batch / later, "peak_rss_mb": _rss_mb(),
          "train_rss_mb": max(clean_rss or round_rss[-1:]), "augment": augment,
          "state_mb": state_bytes / 2**20, "checkpoint_mb": ckpt_bytes / 2**20,
          "per_client_state_bytes": {str(k): v for k, v in sim.algorithm.per_client_bytes.items()},
          "round_times_s": times}


def torch_point(width: float, c: int, rounds: int, steps: int, batch: int) -> dict:
  """The PyTorch loop on a cohort of ``c`` clients (cuts in the same tiers)."""
  import numpy as np
  import torch

  import torch_reference as ref
  from bench_throughput import _rss_peak_mb, _rss_reset
  from hsee_jax.fleet import assign_tiers
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cuts = np.asarray([t[0] for t in TIERS])[assign_tiers([t[1] for t in TIERS], c, 0)]
  clients = [ref.Client(int(cut), width, 10) for cut in cuts]
  images = torch.randn(4096, 3, 32, 32)
  labels = torch.randint(0, 10, (4096,))
  gen = torch.Generator().manual_seed(0)
  times, rss = [], []
  for _ in range(rounds + 1):
    _rss_reset()
    t0 = time.perf_counter()
    ref.run_round(clients, images, labels, steps, batch, gen)
    times.append(time.perf_counter() - t0)
    rss.append(_rss_peak_mb())
  later = statistics.median(times[1:])
  return {"system": "pytorch", "strategy": "averaging", "width": width, "num_clients": c,
          "clients_per_round": c, "first_round_s": times[0], "round_s": later,
          "images_per_s": c * steps * batch / later, "peak_rss_mb": _rss_mb(),
          "train_rss_mb": max(rss[1:]), "round_times_s": times}


def _child(args, spec: dict) -> dict:
  if not spec.get("torch"):
    spec = dict(spec, train_images=args.train_images, max_rounds=args.max_rounds)
  cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--rounds", str(args.rounds),
         "--steps", str(args.steps), "--batch", str(args.batch), "--out", args.out]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if r.returncode != 0:
    raise RuntimeError(f"bench point {spec} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--strategies", default="averaging,sequential")
  p.add_argument("--widths", default="0.125,0.25")
  p.add_argument("--ns", default="16,128,1024,10000", help="fleet sizes at C = --fixed-c")
  p.add_argument("--fixed-c", type=int, default=16)
  p.add_argument("--cs", default="4,16,64", help="cohort sizes at N = --fixed-n")
  p.add_argument("--fixed-n", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after the first")
  p.add_argument("--max-rounds", type=int, default=40,
                 help="rounds at most, looking for --rounds rounds that compile nothing")
  p.add_argument("--train-images", type=int, default=TRAIN_IMAGES,
                 help="synthetic train set size, the same for every N (2 per client beyond it)")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--mode", default="auto", help="execution mode of hsee_jax (default: auto)")
  p.add_argument("--chunks", default="", help="(c): client chunks to sweep, e.g. 1,2,4,8")
  p.add_argument("--chunk-modes", default="unrolled,loop", help="(c): modes to sweep")
  p.add_argument("--augment", action="store_true", help="augment in hsee_jax (torch does not)")
  p.add_argument("--iot", action="store_true",
                 help="(d): N = --fixed-n, C = --fixed-c without and with device speeds (IOT)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    spec = json.loads(args.child)
    fn = torch_point if spec.pop("torch", False) else point
    print(json.dumps(fn(**spec, rounds=args.rounds, steps=args.steps, batch=args.batch)))
    return
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  have_torch = not args.no_torch
  if have_torch:
    try:
      import torch  # noqa: F401
    except ImportError:
      print("[bench_fleet] torch not installed (pip install -e '.[bench]'): no PyTorch column")
      have_torch = False
  rows = []
  for width in map(float, args.widths.split(",")):
    for strategy in args.strategies.split(","):
      base = dict(strategy=strategy, width=width, mode=args.mode, augment=args.augment)
      points = [("a", dict(base, n=n, c=args.fixed_c)) for n in map(int, args.ns.split(",") if args.ns else [])]
      points += [("b", dict(base, n=args.fixed_n, c=int(c))) for c in args.cs.split(",") if c]
      if args.chunks and strategy == "averaging":  # Sequential runs one client at a time
        c_max = max([int(c) for c in args.cs.split(",") if c] or [args.fixed_c])
        points += [("c", dict(base, n=args.fixed_n, c=c_max, mode=m, chunk=int(k)))
                   for m in args.chunk_modes.split(",") for k in args.chunks.split(",")]
      if args.iot and strategy == "averaging":
        points += [("d", dict(base, n=args.fixed_n, c=args.fixed_c, iot=iot)) for iot in (False, True)]
      for sweep, spec in points:
        row = _child(args, spec)
        row["sweep"] = sweep
        rows.append(row)
        print(f"[bench_fleet] {strategy} w={width} N={spec['n']:>5} C={spec['c']:>3} "
              f"{row['mode']}/{row['chunk']}{' iot' if row['iot'] else ''}: {row['round_s']:.2f} s/round "
              f"({row['images_per_s']:.0f} img/s), compile {row['compile_s']:.1f} s, "
              f"RSS {row['peak_rss_mb']:.0f} MB (training {row['train_rss_mb']:.0f} MB), "
              f"state {row['state_mb']:.1f} MB, checkpoint {row['checkpoint_mb']:.1f} MB", flush=True)
    if have_torch:
      for c in sorted({args.fixed_c, *(int(c) for c in args.cs.split(",") if c)}):
        row = _child(args, dict(torch=True, width=width, c=c))
        row["sweep"] = "torch"
        rows.append(row)
        print(f"[bench_fleet] pytorch w={width} C={c:>3}: {row['round_s']:.2f} s/round "
              f"({row['images_per_s']:.0f} img/s)", flush=True)
  iot = {r["iot"]: r for r in rows if r.get("sweep") == "d"}
  result = {"args": vars(args), "rows": rows}
  if len(iot) == 2:   # the same fleet without and with device speeds and a deadline
    result["iot_round_ratio"] = iot[True]["round_s"] / iot[False]["round_s"]
    print(f"[bench_fleet] device speeds drawn per client: "
          f"{result['iot_round_ratio']:.3f}x the round time of the same fleet without them")
  (out / "bench_fleet.json").write_text(json.dumps(result, indent=2))
  keys = ["system", "strategy", "width", "sweep", "num_clients", "clients_per_round", "mode",
          "chunk", "iot", "augment", "first_round_s", "compile_s", "round_s", "images_per_s",
          "peak_rss_mb", "train_rss_mb", "state_mb", "checkpoint_mb"]
  with open(out / "bench_fleet.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  _plot(rows, out)
  print(f"[bench_fleet] wrote {out}/bench_fleet.json, bench_fleet.csv, bench_fleet.png")


def _plot(rows, out: Path) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, axes = plt.subplots(1, 4, figsize=(20, 4))
  for key in sorted({(r["strategy"], r["width"]) for r in rows if r["system"] == "hsee_jax"}):
    a = [r for r in rows if r["system"] == "hsee_jax" and (r["strategy"], r["width"]) == key
         and r["sweep"] == "a"]
    b = [r for r in rows if r["system"] == "hsee_jax" and (r["strategy"], r["width"]) == key
         and r["sweep"] == "b"]
    label = f"{key[0]} w={key[1]}"
    axes[0].plot([r["num_clients"] for r in a], [r["round_s"] for r in a], marker="o", label=label)
    axes[1].plot([r["num_clients"] for r in a], [r["peak_rss_mb"] for r in a], marker="o", label=label)
    axes[1].plot([r["num_clients"] for r in a], [r["train_rss_mb"] for r in a], marker=".", ls=":",
                 label=label + " (training rounds)")
    axes[2].plot([r["clients_per_round"] for r in b], [r["images_per_s"] for r in b], marker="o",
                 label=label)
  for w in sorted({r["width"] for r in rows if r["system"] == "pytorch"}):
    t = sorted((r for r in rows if r["system"] == "pytorch" and r["width"] == w),
               key=lambda r: r["clients_per_round"])
    axes[2].plot([r["clients_per_round"] for r in t], [r["images_per_s"] for r in t], ls="--",
                 marker="x", label=f"pytorch w={w}")
  for key in sorted({(r["mode"], r["width"]) for r in rows if r.get("sweep") == "c"}):
    c = sorted((r for r in rows if r.get("sweep") == "c" and (r["mode"], r["width"]) == key),
               key=lambda r: r["chunk"])
    axes[3].plot([r["chunk"] for r in c], [r["images_per_s"] for r in c], marker="o",
                 label=f"averaging {key[0]} w={key[1]}")
  for ax, (x, y) in zip(axes, [("fleet size N", "seconds per round (after compilation)"),
                               ("fleet size N", "peak RSS (MB)"),
                               ("clients per round C", "images/s"),
                               ("client chunk", "images/s")]):
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_xscale("log")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "bench_fleet.png", dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
