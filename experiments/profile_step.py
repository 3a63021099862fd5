"""Where one client's training step spends its time: a jax.profiler trace of
the compiled split step, joined with the XLA dump of the same executable, next
to a torch.profiler breakdown of the PyTorch reference step.

    python experiments/profile_step.py --out runs/profile_step
    python experiments/profile_step.py --no-materialize --out runs/profile_step_nomat
    python experiments/profile_step.py --xla-flags=--xla_cpu_experimental_ynn_fusion_type= \\
        --out runs/profile_step_eigen

One client at ``--cut`` (client part + exit head and its server part, as in
the Averaging benchmark), per-client ``--batch`` and ``--width``. The step is
``strategies.split_update(...).step`` jitted once, exactly what the training
loop runs. XLA:CPU's thunk runtime records one trace event per thunk (with
``--xla_cpu_enable_xprof_traceme``); each thunk is an instruction of the
optimised HLO (``--xla_dump_to``), which says what it computes, so time is
summed per category:

* ``conv forward`` / ``conv input-grad`` / ``conv kernel-grad``: the three
  convolutions of each conv layer (told apart by the op_name metadata and by
  the output being a kernel-shaped array);
* ``layout copy/transpose``: fusions whose result is a copy or transpose
  (XLA:CPU transposes activations and output gradients before a kernel-grad
  convolution, and fuses the elementwise ops that produce them into the
  transpose, recomputing them);
* ``reduce``: batch-norm statistics and their gradients, the loss;
* ``dot``: the exit head and classifier;
* ``elementwise``: everything else (BN apply, ReLU, the optimiser update).

The PyTorch side groups ``torch.profiler`` self CPU time by operator into the
same categories as far as names allow. Writes profile.json and profile.csv.
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--width", type=float, default=0.25)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--cut", type=int, default=5)
  p.add_argument("--steps", type=int, default=20, help="profiled steps (after 3 warm-up steps)")
  p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this run")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-materialize", action="store_true",
                 help="models.materialize replaced by the identity (what it saves)")
  p.add_argument("--out", required=True)
  return p.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
DUMP = tempfile.mkdtemp(prefix="hsee_xla_dump_") if ARGS is not None else None
if ARGS is not None:  # XLA reads its flags once, when the backend starts
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS", ""), ARGS.xla_flags, "--xla_cpu_enable_xprof_traceme=true",
      f"--xla_dump_to={DUMP}", "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=.*split_step.*"]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsee_jax import strategies  # noqa: E402
from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax.config import Config  # noqa: E402

CATEGORIES = ("conv forward", "conv input-grad", "conv kernel-grad", "layout copy/transpose",
              "reduce", "dot", "elementwise")


# -- the optimised HLO: what each thunk computes ------------------------------------
def _computations(text: str) -> dict[str, str]:
  """Body text of every computation in an HLO module dump, by name."""
  out, name, lines = {}, None, []
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%([\w.-]+) .*\{$", line)
    if m:
      name, lines = m.group(1), []
    elif line.startswith("}") and name:
      out[name] = "\n".join(lines)
      name = None
    elif name:
      lines.append(line)
  entry = re.search(r"^ENTRY %([\w.-]+)", text, re.M)
  out["__entry__"] = out.get(entry.group(1), "") if entry else ""
  return out


def _conv_kind(line: str) -> str:
  op = re.search(r'op_name="([^"]*)"', line)
  out_shape = re.search(r"= f32\[([\d,]+)\]", line)
  dims = [int(d) for d in out_shape.group(1).split(",")] if out_shape else []
  if op and "transpose(" in op.group(1):
    return "conv input-grad"
  if op and "transpose(" not in op.group(1) and "jvp(" in op.group(1):
    return "conv forward"
  # XLA-made kernel-gradient convolutions carry no op_name; their output is
  # [Cin, kh, kw, Cout] (small spatial dims) where activations are [N, H, W, C].
  if len(dims) == 4 and dims[1] <= 7 and dims[2] <= 7:
    return "conv kernel-grad"
  return "conv forward"


def classify(hlo_text: str) -> dict[str, str]:
  """Category of every instruction of the entry computation (= every thunk)."""
  comps = _computations(hlo_text)
  kinds = {}
  for line in comps["__entry__"].splitlines():
    m = re.match(r"^\s+(?:ROOT )?%([\w.-]+) = .*? ([a-z-]+)\(", line)
    if not m:
      continue
    name, opcode = m.groups()
    body = line
    callee = re.search(r"calls=%([\w.-]+)", line)
    if callee:
      body = comps.get(callee.group(1), "")
    root = re.search(r"^\s+ROOT %[\w.-]+ = \S+ ([a-z-]+)\(", body, re.M)
    root_op = root.group(1) if (callee and root) else opcode
    conv = next((l for l in body.splitlines() if " convolution(" in l), None)
    if conv:
      kinds[name] = _conv_kind(conv)
    elif " dot(" in body:
      kinds[name] = "dot"
    elif " reduce(" in body or " reduce-window(" in body:
      kinds[name] = "reduce"
    elif root_op in ("copy", "transpose"):
      # a fusion whose result is a copy/transpose: moves data, plus whatever
      # elementwise producers XLA fused (recomputed) into it
      kinds[name] = "layout copy/transpose"
    else:
      kinds[name] = "elementwise"
  return kinds


def _trace_events(trace_dir: str) -> list[dict]:
  files = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
  if not files:
    raise SystemExit(f"no perfetto trace written under {trace_dir}")
  data = json.load(gzip.open(files[0]))
  return [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]


def _matmul_gflops(matmul, a, wait, reps=5) -> float:
  """The dense float32 matmul rate (2048^3), to tell kernel quality from machine speed."""
  wait(matmul(a, a))
  t0 = time.perf_counter()
  for _ in range(reps):
    wait(matmul(a, a))
  return 2 * a.shape[0] ** 3 * reps / (time.perf_counter() - t0) / 1e9


# -- hsee_jax ------------------------------------------------------------------
def profile_jax(args) -> dict:
  cfg = Config(dataset="synthetic", synthetic_shape=(32, 32, 10, max(256, 4 * args.batch), 16),
               width=args.width, cuts=(args.cut,), batch_size=args.batch, rounds=100,
               augment=False, mode="loop", schedule="constant")
  _, strategy = train_lib.build(cfg)
  state = strategy.init_state(jax.random.PRNGKey(0))
  update = strategies.split_update(strategy.net, args.cut, preprocess=strategies.preprocessing(augment=False))

  def split_step(shared, carry, x):
    return update.step(shared, carry, x)

  step = jax.jit(split_step, donate_argnums=1)
  client, server = strategies.client_server_parts(state, args.cut, strategy.ctx.tx)
  carry = update.init(strategy.ctx.train_set, (client, server, jax.random.PRNGKey(1)))
  n = strategy.ctx.train_set.labels.shape[0]
  xs = [(jnp.asarray((jnp.arange(args.batch) * 7 + s * args.batch) % n),
         jnp.asarray([0.05, cfg.momentum, cfg.weight_decay, cfg.exit_loss_weight], jnp.float32))
        for s in range(args.steps + 3)]
  for x in xs[:3]:
    carry = step(strategy.ctx.train_set, carry, x)
  jax.block_until_ready(carry)
  state_box = [carry]

  def run(n):  # untraced steps, for the wall time (the profiler adds overhead)
    c = state_box[0]
    for i in range(n):
      c = step(strategy.ctx.train_set, c, xs[3 + i % args.steps])
    state_box[0] = jax.block_until_ready(c)

  carry = state_box[0]
  trace_dir = tempfile.mkdtemp(prefix="hsee_trace_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for x in xs[3:]:
    carry = step(strategy.ctx.train_set, carry, x)
  state_box[0] = jax.block_until_ready(carry)
  jax.profiler.stop_trace()

  dumps = sorted(glob.glob(f"{DUMP}/*split_step*cpu_after_optimizations.txt"))
  if not dumps:
    raise SystemExit(f"no optimised HLO of split_step dumped under {DUMP}")
  kinds = classify(Path(dumps[-1]).read_text())
  per_thunk = collections.Counter()
  for e in _trace_events(trace_dir):
    if e["name"] in kinds:
      per_thunk[e["name"]] += e["dur"] / 1e3 / args.steps
  per_cat = collections.Counter()
  for name, ms in per_thunk.items():
    per_cat[kinds[name]] += ms
  return run, {
          "matmul_gflops": _matmul_gflops(jax.jit(jnp.dot), jnp.ones((2048, 2048)), jax.block_until_ready),
          "traced_ms_per_step": sum(per_thunk.values()),
          "categories_ms": {c: per_cat.get(c, 0.0) for c in CATEGORIES},
          "thunks": len(kinds),
          "top_thunks_ms": [{"thunk": k, "category": kinds[k], "ms": v}
                            for k, v in per_thunk.most_common(15)]}


# -- PyTorch reference --------------------------------------------------------------
def _torch_category(op: str) -> str | None:
  if "convolution_backward" in op:
    return "conv backward (input + kernel grad)"
  if "convolution" in op or "conv2d" in op:
    return "conv forward"
  if "batch_norm" in op:
    return "batch norm (fwd + bwd)"
  if op in ("aten::addmm", "aten::mm", "aten::linear"):
    return "dot"
  if op in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::index", "aten::empty"):
    return "layout/copy/alloc"
  return "elementwise/other" if op.startswith("aten::") else None


def profile_torch(args) -> dict:
  import torch
  import torch_reference as ref
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  client = ref.Client(args.cut, args.width, 10)
  x = torch.randn(args.batch, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch,))
  for _ in range(3):
    client.step(x, y)

  def run(n):
    for _ in range(n):
      client.step(x, y)

  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      client.step(x, y)
  cats = collections.Counter()
  for ev in prof.key_averages():
    c = _torch_category(ev.key)
    if c:
      cats[c] += ev.self_cpu_time_total / 1e3 / args.steps
  return run, {
          "matmul_gflops": _matmul_gflops(torch.matmul, torch.ones(2048, 2048), lambda r: r),
          "categories_ms": dict(cats.most_common()), "torch": torch.__version__}


def main():
  args = ARGS
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runs = {}
  if args.no_materialize:
    from hsee_jax import models
    models.materialize = lambda x: x
  runs["hsee_jax"], prof = profile_jax(args)
  result = {"jax": jax.__version__, "backend": jax.default_backend(), "args": vars(args),
            "xla_flags": os.environ["XLA_FLAGS"], "hsee_jax": prof}
  if not args.no_torch:
    try:
      runs["pytorch"], result["pytorch"] = profile_torch(args)
    except ImportError:
      print("[profile] torch not installed (pip install -e '.[bench]'): no PyTorch column")
  # wall time per step: chunks of the implementations interleaved, so machine
  # noise falls on both alike; the median chunk
  chunk, times = max(1, args.steps // 4), {k: [] for k in runs}
  for _ in range(5):
    for k, run in runs.items():
      t0 = time.perf_counter()
      run(chunk)
      times[k].append((time.perf_counter() - t0) / chunk)
  for k in runs:
    wall = statistics.median(times[k])
    result[k].update(wall_ms_per_step=wall * 1e3, images_per_s=args.batch / wall,
                     wall_ms_chunks=[t * 1e3 for t in times[k]])
  (out / "profile.json").write_text(json.dumps(result, indent=2))
  with open(out / "profile.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["implementation", "category", "ms_per_step"])
    for impl in ("hsee_jax", "pytorch"):
      if impl in result:
        w.writerow([impl, "wall", f"{result[impl]['wall_ms_per_step']:.3f}"])
        for c, ms in result[impl]["categories_ms"].items():
          w.writerow([impl, c, f"{ms:.3f}"])
  j = result["hsee_jax"]
  print(f"[profile] hsee_jax: {j['wall_ms_per_step']:.1f} ms/step wall, "
        f"{j['traced_ms_per_step']:.1f} ms in {j['thunks']} thunks; "
        f"2048^2 matmul {j['matmul_gflops']:.0f} GFLOP/s")
  for c, ms in j["categories_ms"].items():
    print(f"[profile]   {c:<24} {ms:7.2f} ms")
  if "pytorch" in result:
    t = result["pytorch"]
    print(f"[profile] pytorch: {t['wall_ms_per_step']:.1f} ms/step wall; "
          f"2048^2 matmul {t['matmul_gflops']:.0f} GFLOP/s")
    for c, ms in t["categories_ms"].items():
      print(f"[profile]   {c:<36} {ms:7.2f} ms")
  print(f"[profile] wrote {out}/profile.json, profile.csv")


if __name__ == "__main__":
  main()
