"""How long an orbax checkpoint of a whole run takes: the paper's ResNet-18
(width 1.0) with 3 and 16 clients, Averaging (a server part per client).

    python experiments/bench_checkpoint.py --out runs/bench_checkpoint

For each client count: state size, the time the training loop is blocked by
an asynchronous save (``save`` returning), the time until the save is on
disk (``wait``), and the restore time. Writes bench_checkpoint.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsee_jax import rundir  # noqa: E402
from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax.checkpoint import Checkpointer, meta_for  # noqa: E402
from hsee_jax.config import Config  # noqa: E402


def measure(k: int, width: float, workdir: Path) -> dict:
  cfg = Config(dataset="synthetic", synthetic_shape=(32, 32, 10, 64, 8), width=width,
               cuts=tuple((3, 5, 7)[i % 3] for i in range(k)), batch_size=8, local_steps=1)
  _, strategy = train_lib.build(cfg)
  state = jax.block_until_ready(strategy.init_state(jax.random.PRNGKey(0)))
  nbytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(state))
  d = workdir / f"k{k}"
  with Checkpointer(d, keep=2) as ck:
    t0 = time.perf_counter()
    ck.save(1, state, meta_for(cfg, 1, jax.random.PRNGKey(1)))
    blocked = time.perf_counter() - t0
    ck.finish(1)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = rundir.restore_state(strategy.abstract_state(), ck, cfg)[0]
    jax.block_until_ready(restored)
    restore = time.perf_counter() - t0
  on_disk = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
  shutil.rmtree(d)
  return {"clients": k, "width": width, "state_mb": nbytes / 2**20, "on_disk_mb": on_disk / 2**20,
          "save_blocking_s": blocked, "save_total_s": total, "restore_s": restore}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--clients", default="3,16")
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
  args = p.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  work = Path(args.workdir or tempfile.mkdtemp(prefix="hsee_ckpt_bench_"))
  rows = []
  for k in map(int, args.clients.split(",")):
    rows.append(measure(k, args.width, work))
    r = rows[-1]
    print(f"[ckpt] {k:>2} clients: state {r['state_mb']:.0f} MB ({r['on_disk_mb']:.0f} MB on disk), "
          f"save blocks {r['save_blocking_s']:.2f}s, on disk after {r['save_total_s']:.2f}s, "
          f"restore {r['restore_s']:.2f}s", flush=True)
  (out / "bench_checkpoint.json").write_text(json.dumps(
      {"backend": jax.default_backend(), "workdir": str(work), "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
