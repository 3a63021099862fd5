"""Throughput of one Averaging round: hsee_jax executions against a PyTorch loop.

    python experiments/bench_throughput.py --out runs/bench            # this CPU: width 0.25
    python experiments/bench_throughput.py --width 1.0 --ks 8,16 --batch 32 --out runs/bench_gpu
    python experiments/bench_throughput.py --precision bfloat16 --executions loop,torch_amp ...

For K clients (cuts spread over 3, 5, 7) and each execution:
  vmap      hsee_jax, clients stacked per cut, one jit(vmap(step))
  unrolled  hsee_jax, one jitted computation with every client's step side by side
  loop      hsee_jax, Python loop over clients calling one jitted single-client step
            (the three in --precision: float32, bfloat16 or auto)
  torch     PyTorch eager reference (experiments/torch_reference.py), loop over clients,
            float32, a host read of the losses after every step (the first reference)
  torch_fair     the same without a host read inside a round, channels_last, float32
  torch_amp      torch_fair under autocast bfloat16
  torch_compile  torch_amp with torch.compile
(the PyTorch ones on the GPU when torch sees one).
Rounds of the executions are interleaved (the order rotates each repetition) so
machine noise falls on all alike. Reported per (execution, K): median seconds
per round and images/s after warm-up, the first round's extra time (compile),
peak host RSS during a round (VmHWM after resetting it; the whole process, so
it includes every execution's resident state), device memory where the
backend reports it, FLOPs per training image and, on a GPU, MFU.
Writes bench.json, bench.csv and bench.png into --out (:func:`measure` is the
same for other scripts: experiments/gpu_check.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_io  # noqa: E402
from hsee_jax import costs, models  # noqa: E402
from hsee_jax import precision as precision_lib  # noqa: E402
from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax.config import Config  # noqa: E402

CUT_CYCLE = (3, 5, 7)
# Dense peaks, FLOP/s: (bf16, tf32). MFU is reported against the bf16 peak, the
# usual reference; a float32 step runs on TF32 tensor cores under JAX's
# default precision, so ``mfu_tf32`` is against that peak. FLOPs are the
# model's (the float32 cost table's) whatever the precision.
PEAK_FLOPS = {"H100": (989e12, 495e12), "H200": (989e12, 495e12), "A100": (312e12, 156e12)}


def _rss_reset():
  try:
    Path("/proc/self/clear_refs").write_text("5")
  except OSError:
    pass


def _rss_peak_mb() -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def _device_mem_mb() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


class JaxExecution:
  def __init__(self, mode, k, args):
    n = max(args.batch * 4, 256)
    cfg = Config(dataset="synthetic", synthetic_shape=(32, 32, 10, n, 16), width=args.width,
                 model=getattr(args, "model", "resnet18"),
                 precision=getattr(args, "precision", "float32"),
                 cuts=tuple(CUT_CYCLE[i % 3] for i in range(k)), batch_size=args.batch,
                 local_steps=args.steps, rounds=1000, augment=False, mode=mode,
                 schedule="constant", client_chunk=k)  # each cut's clients in one call
    _, self.strategy = train_lib.build(cfg)
    self.state = self.strategy.init_state(jax.random.PRNGKey(0))
    self.key = jax.random.PRNGKey(1)
    self.rnd = 0

  def round(self):
    self.state, m, _ = self.strategy.run_round(self.state, self.rnd, self.key)
    jax.block_until_ready(self.state)
    self.rnd += 1
    return m


class TorchExecution:
  """A PyTorch reference variant, on the GPU when torch sees one (as a researcher would run it)."""

  def __init__(self, k, args, variant="torch"):
    import torch
    import torch_reference as ref
    torch.manual_seed(0)
    self.torch, self.ref, self.args = torch, ref, args
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.clients = [ref.Client(CUT_CYCLE[i % 3], args.width, 10, device=self.device,
                               variant=variant) for i in range(k)]
    n = max(args.batch * 4, 256)
    self.images = torch.randn(n, 3, 32, 32, device=self.device)
    self.labels = torch.randint(0, 10, (n,), device=self.device)
    self.gen = torch.Generator().manual_seed(0)

  def round(self):
    self.ref.run_round(self.clients, self.images, self.labels, self.args.steps, self.args.batch,
                       self.gen)

  def device_peak_mb(self):
    if self.device != "cuda":
      return None
    return self.torch.cuda.max_memory_allocated() / 2**20


def flops_per_image(width):
  """Training FLOPs per image (client + server part) at each cut, and the cost table."""
  net = models.SplitResNet18(10, width)
  per_cut = {row["cut"]: row for row in costs.cost_table(net, (32, 32, 3))}
  return {c: v["client_train_flops"] + v["server_train_flops"] for c, v in per_cut.items()}, per_cut


TORCH_EXECUTIONS = ("torch", "torch_fair", "torch_amp", "torch_compile")
JAX_EXECUTIONS = ("vmap", "unrolled", "loop")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ks", default="1,2,4,8,16")
  p.add_argument("--width", type=float, default=0.25)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=3, help="local steps per client per round")
  p.add_argument("--reps", type=int, default=3, help="timed rounds per execution")
  p.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "auto"),
                 help="of the hsee_jax executions (Config.precision)")
  p.add_argument("--executions", default="vmap,unrolled,loop,torch",
                 help=f"of {', '.join(JAX_EXECUTIONS + TORCH_EXECUTIONS)}")
  p.add_argument("--out", required=True)
  return p


def usable_executions(names: list[str], log=print) -> list[str]:
  """``names`` checked, the PyTorch ones left out (said) when torch is not installed."""
  bad = [e for e in names if e not in JAX_EXECUTIONS + TORCH_EXECUTIONS]
  if bad:
    raise SystemExit(f"--executions: unknown {', '.join(bad)}; "
                     f"one of {', '.join(JAX_EXECUTIONS + TORCH_EXECUTIONS)}")
  if any(e in TORCH_EXECUTIONS for e in names):
    try:
      import torch
      torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
      log("[bench] torch not installed (pip install -e '.[bench]'): skipping the PyTorch reference")
      return [e for e in names if e not in TORCH_EXECUTIONS]
  return list(names)


def measure(args, execs: list[str], log=print) -> list[dict]:
  """One row per (K, execution) for ``args`` (``parser()``'s fields)."""
  device = jax.devices()[0]
  flops, _ = flops_per_image(args.width)
  peak = next((v for k, v in PEAK_FLOPS.items() if k in getattr(device, "device_kind", "")), None)
  rows = []
  for k in map(int, str(args.ks).split(",")):
    cuts = [CUT_CYCLE[i % 3] for i in range(k)]
    images = k * args.steps * args.batch
    flops_round = sum(flops[c] for c in cuts) * args.steps * args.batch
    runners, first = {}, {}
    for e in execs:
      t0 = time.perf_counter()
      runners[e] = TorchExecution(k, args, e) if e in TORCH_EXECUTIONS else JaxExecution(e, k, args)
      runners[e].round()
      first[e] = time.perf_counter() - t0
      log(f"[bench] K={k:>2} {e:>13}: set-up + first round {first[e]:.1f}s")
    times = {e: [] for e in execs}
    rss = {e: 0.0 for e in execs}
    for rep in range(args.reps):
      order = execs[rep % len(execs):] + execs[:rep % len(execs)]
      for e in order:
        _rss_reset()
        t0 = time.perf_counter()
        runners[e].round()
        times[e].append(time.perf_counter() - t0)
        rss[e] = max(rss[e], _rss_peak_mb())
    for e in execs:
      med = statistics.median(times[e])
      is_torch = e in TORCH_EXECUTIONS
      row = {"execution": e, "clients": k, "width": args.width, "batch": args.batch,
             "steps": args.steps,
             "precision": ("bfloat16" if "amp" in e or "compile" in e else "float32") if is_torch
             else precision_lib.resolve(args.precision),
             "seconds_per_round": med, "images_per_s": images / med,
             "compile_seconds": max(0.0, first[e] - med), "peak_rss_mb": rss[e],
             "device_peak_mb": runners[e].device_peak_mb() if is_torch else _device_mem_mb(),
             "torch_device": runners[e].device if is_torch else None,
             "round_times": times[e], "flops_per_round": flops_round,
             "achieved_tflops": flops_round / med / 1e12,
             "mfu": (flops_round / med / peak[0]) if peak else None,
             "mfu_tf32": (flops_round / med / peak[1]) if peak else None}
      rows.append(row)
      log(f"[bench] K={k:>2} {e:>13}: {row['images_per_s']:8.1f} img/s  "
          f"{med:7.3f} s/round  compile {row['compile_seconds']:.1f}s  rss {rss[e]:.0f} MB")
    del runners
  return rows


def device_info() -> dict:
  device = jax.devices()[0]
  return {"device": str(device), "device_kind": getattr(device, "device_kind", ""),
          "backend": jax.default_backend(), "jax": jax.__version__}


def main():
  args = parser().parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = lambda s: print(s, flush=True)
  execs = usable_executions(args.executions.split(","), log)
  flops, per_cut = flops_per_image(args.width)
  rows = measure(args, execs, log)
  result = {**device_info(), "args": vars(args),
            "flops_per_training_image": {str(c): f for c, f in flops.items()},
            "cut_costs": {str(c): v for c, v in per_cut.items()}, "rows": rows}
  bench_io.write_tables(out, "bench", result, rows, drop=("round_times",))
  if not bench_io.line_plot(out / "bench.png", rows, "execution", "clients", "images_per_s",
                            xlabel="clients K", ylabel="images/s (all clients)",
                            title=f"Averaging round, width {args.width}, batch {args.batch}, "
                                  f"{jax.default_backend()}"):
    log("[bench] matplotlib not installed: no plot")
  log(f"[bench] wrote {out}/bench.json, bench.csv, bench.png")


if __name__ == "__main__":
  main()
