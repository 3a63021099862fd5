"""Why client-parallel training loses to a loop on a GPU, one layer at a time:
a 3x3 convolution with per-client weights, forward and backward (gradients of
input and kernel), written four ways.

    python experiments/client_conv.py --out runs/client_conv                 # GPU: width 1.0
    python experiments/client_conv.py --out runs/client_conv_cpu --width 0.25 --ks 8 --batches 32 --precisions float32

  separate  K ordinary convolutions side by side in one program (what the
            ``unrolled`` execution runs; ``loop`` runs one of them per call)
  vmap      ``jax.vmap`` over the clients (the ``vmap`` execution): XLA sees
            one convolution whose ``feature_group_count`` is K (the client
            axis folded into the channels), an input gradient that is again a
            grouped convolution, and a kernel gradient with ``batch_group_count`` K
  im2col    the nine shifted copies of the input concatenated along the
            channels, one batched matrix product per layer (the client axis as
            the batch of ``dot_general``): no grouped kernel, 9x the input's memory
  matmul9   nine shifted batched matrix products accumulated: no grouped
            kernel, no 9x copy, nine times the calls

At the ResNet-18 (CIFAR) stage shapes (stage s: 32/2^(s-1) pixels square,
64 * width * 2^(s-1) channels in and out, stride 1), K clients of batch B, in
each precision (inputs and kernels cast to it; the loss in float32, as
``hsee_jax.precision`` does). Milliseconds per layer (forward + both
gradients, median of --reps timings of --iters calls each, formulations
interleaved), and what XLA made of each program: the convolutions of the
lowered program by their group counts, and the convolution kernels, matrix
products and transposes of the compiled one (on a GPU, the cuDNN calls by
kind: forward, backward-input, backward-filter, with their group counts).
:func:`check` tells whether the four agree. Writes client_conv.json, .csv,
.md and .png into --out after every shape (:func:`measure` is the same for
experiments/gpu_check.py).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_io  # noqa: E402
from hsee_jax.checkpoint import first_line  # noqa: E402

FORMS = ("separate", "vmap", "im2col", "matmul9")
DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def _shifted(x):
  """The nine 3x3 taps of ``x`` [..., H, W, C], SAME padding, in HWIO tap order."""
  h, w = x.shape[-3], x.shape[-2]
  pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
  xp = jnp.pad(x, pad)
  return [xp[..., i:i + h, j:j + w, :] for i in range(3) for j in range(3)]


def conv_separate(x, w):
  return jnp.stack([_conv(x[k], w[k]) for k in range(x.shape[0])])


def conv_vmap(x, w):
  return jax.vmap(_conv)(x, w)


def conv_im2col(x, w):
  k, _, _, c, d = w.shape
  patches = jnp.concatenate(_shifted(x), axis=-1)             # [K, B, H, W, 9C]
  return jnp.einsum("kbhwp,kpd->kbhwd", patches, w.reshape(k, 9 * c, d))


def conv_matmul9(x, w):
  taps = _shifted(x)
  out = 0
  for t, xs in enumerate(taps):
    out = out + jnp.einsum("kbhwc,kcd->kbhwd", xs, w[:, t // 3, t % 3])
  return out


CONVS = {"separate": conv_separate, "vmap": conv_vmap, "im2col": conv_im2col,
         "matmul9": conv_matmul9}


def train_layer(form: str, dtype):
  """(x, w, g) -> (loss, (dx, dw)): the layer's forward (the loss needs it)
  and both gradients of loss = sum(conv(x, w) * g), computed in ``dtype``,
  loss and gradients float32."""
  conv = CONVS[form]

  def loss(x, w, g):
    y = conv(x.astype(dtype), w.astype(dtype))
    return (y.astype(jnp.float32) * g).sum()
  return jax.jit(jax.value_and_grad(loss, (0, 1)))


def inputs(k: int, batch: int, size: int, channels: int, seed: int = 0):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (k, batch, size, size, channels))
  w = jax.random.normal(kw, (k, 3, 3, channels, channels)) / (3 * channels ** 0.5)
  g = jax.random.normal(kg, (k, batch, size, size, channels))
  return x, w, g


def check(k=3, batch=2, size=6, channels=4) -> dict:
  """Largest relative difference of each formulation's loss, dx and dw from
  ``separate``'s, float32."""
  args = inputs(k, batch, size, channels)
  ref = jax.tree.leaves(train_layer("separate", jnp.float32)(*args))
  out = {}
  for form in FORMS[1:]:
    got = jax.tree.leaves(train_layer(form, jnp.float32)(*args))
    out[form] = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12))
                    for a, b in zip(got, ref))
  return out


_ATTR = re.compile(r"(feature_group_count|batch_group_count)\s*=\s*(\d+)")
_CUDNN = re.compile(r'custom_call_target="__cudnn\$(conv\w*)"')


def _groups(line: str) -> str:
  attrs = dict(_ATTR.findall(line))
  f, b = int(attrs.get("feature_group_count", 1)), int(attrs.get("batch_group_count", 1))
  return "plain" if f == b == 1 else f"feature_groups={f}" if b == 1 else f"batch_groups={b}"


def _kind(line: str) -> str | None:
  """What one instruction of an optimised HLO module is: a cuDNN convolution
  (by kind and group count), a convolution, a matrix product (a cuBLAS call
  or a dot, also the one inside a Triton GEMM fusion) or a transpose; None
  for anything else, fusion call sites included (what they fuse is counted
  where it is written)."""
  m = _CUDNN.search(line)
  if m:
    return f"cudnn {m.group(1)} {_groups(line)}"
  if re.search(r"\bfusion\(", line):
    return None
  if re.search(r"\bconvolution\(", line):
    return "convolution " + _groups(line)
  if "__cublas" in line or re.search(r"\bdot\(", line):
    return "matrix product"
  if re.search(r"\btranspose\(", line):
    return "transpose"
  return None


def program_ops(fn, *args) -> dict:
  """What XLA made of ``fn``: the lowered program's convolutions by group kind
  and its matrix products; the compiled program's convolutions (on a GPU the
  cuDNN calls by kind and group count), matrix products and transposes."""
  lowered = fn.lower(*args)
  low = collections.Counter()
  for line in lowered.as_text().splitlines():
    if "stablehlo.convolution" in line:
      low["convolution " + _groups(line)] += 1
    elif "stablehlo.dot_general" in line:
      low["dot_general"] += 1
  compiled = collections.Counter(k for k in map(_kind, lowered.compile().as_text().splitlines()) if k)
  return {"lowered": dict(low), "compiled": dict(compiled)}


def stage_shape(stage: int, width: float) -> tuple[int, int]:
  """(pixels per side, channels) of ResNet-18's CIFAR stage ``stage`` (1..4) at ``width``."""
  return 32 >> (stage - 1), max(1, int(64 * width)) << (stage - 1)


def measure(args, log=print, on_shape=None, keep_going=lambda: True) -> list[dict]:
  """One row per (stage, batch, K, precision, formulation); the first row of
  each (formulation, K, precision) carries what XLA made of its program
  (``ops``: a second compilation, so only once). A formulation that fails
  (out of memory, say) gets ``error`` in its row and the others go on.
  ``on_shape(rows)`` after each shape; no new shape starts once
  ``keep_going()`` is false."""
  rows, described = [], set()
  forms = [f for f in args.forms.split(",") if f]
  bad = [f for f in forms if f not in FORMS]
  if bad:
    raise SystemExit(f"--forms: unknown {', '.join(bad)}; one of {', '.join(FORMS)}")
  for stage in map(int, str(args.stages).split(",")):
    size, ch = stage_shape(stage, args.width)
    for batch in map(int, str(args.batches).split(",")):
      for k in map(int, str(args.ks).split(",")):
        for prec in args.precisions.split(","):
          if not keep_going():
            return rows
          data = inputs(k, batch, size, ch)
          fns, first, failed = {}, {}, {}
          for f in forms:
            try:
              fns[f] = train_layer(f, jnp.dtype(prec))
              t0 = time.perf_counter()
              jax.block_until_ready(fns[f](*data))
              first[f] = time.perf_counter() - t0
            except Exception as e:  # e.g. out of memory: said in its row, the others go on
              failed[f] = first_line(e)
              fns.pop(f, None)
          ok = [f for f in forms if f not in failed]
          times = {f: [] for f in ok}
          for rep in range(args.reps if ok else 0):
            for f in ok[rep % len(ok):] + ok[:rep % len(ok)]:
              t0 = time.perf_counter()
              for _ in range(args.iters):
                r = fns[f](*data)
              jax.block_until_ready(r)
              times[f].append((time.perf_counter() - t0) / args.iters * 1e3)
          flops = 3 * 2 * 9 * k * batch * size * size * ch * ch   # forward, dx, dw
          base = statistics.median(times[forms[0]]) if forms[0] in times else None
          for f in forms:
            row = {"stage": stage, "size": size, "channels": ch, "batch": batch, "clients": k,
                   "precision": prec, "form": f, "ms": None, "vs_first": None, "tflops": None,
                   "compile_seconds": None, "ops": None, "error": failed.get(f)}
            rows.append(row)
            if f in failed:
              log(f"[client_conv] stage {stage} B={batch} K={k} {prec} {f:>8}: failed: {failed[f]}")
              continue
            ms = statistics.median(times[f])
            row.update(ms=ms, vs_first=ms / base if base else None, tflops=flops / ms / 1e9,
                       compile_seconds=max(0.0, first[f] - ms / 1e3))
            if (f, k, prec) not in described:
              try:
                row["ops"] = program_ops(fns[f], *data)
                described.add((f, k, prec))
              except Exception as e:
                log(f"[client_conv] {f}: no program census ({first_line(e)})")
            log(f"[client_conv] stage {stage} ({size}x{size}x{ch}) B={batch} K={k} {prec} "
                f"{f:>8}: {ms:8.2f} ms  {row['tflops']:.2f} TFLOP/s")
          del data, fns
          if on_shape:
            on_shape(rows)
  return rows


def markdown(rows: list[dict], forms: list[str]) -> list[str]:
  if not rows:
    return ["(no shape measured)"]
  first = forms[0]
  lines = ["| stage (HxWxC) | batch | K | precision | "
           + " | ".join(f"{f} ms" + ("" if f == first else f" (/ {first})") for f in forms) + " |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in forms) + " |"]
  keyed = collections.OrderedDict()
  for r in rows:
    keyed.setdefault((r["stage"], r["size"], r["channels"], r["batch"], r["clients"],
                      r["precision"]), {})[r["form"]] = r
  for (stage, size, ch, b, k, prec), by in keyed.items():
    cells = ["–" if f not in by else "failed" if by[f]["error"] else
             f"{by[f]['ms']:.2f}" + ("" if f == first or by[f]["vs_first"] is None
                                    else f" ({by[f]['vs_first']:.2f})") for f in forms]
    lines.append(f"| {stage} ({size}x{size}x{ch}) | {b} | {k} | {prec} | " + " | ".join(cells) + " |")
  errors = [f"{r['form']} at stage {r['stage']}, batch {r['batch']}, K {r['clients']}, "
            f"{r['precision']}: {r['error']}" for r in rows if r["error"]]
  if errors:
    lines += ["", "Failed: " + "; ".join(errors) + "."]
  seen = {}
  for r in rows:
    if r["ops"]:
      seen.setdefault(r["form"], r["ops"])
  lines += ["", f"What XLA made of each ({rows[0]['precision']}, the first shape's programs):", "",
            "| formulation | lowered | compiled |", "| --- | --- | --- |"]
  fmt = lambda d: ", ".join(f"{v} {k}" for k, v in sorted(d.items())) or "–"
  for f in forms:
    if f in seen:
      lines.append(f"| {f} | {fmt(seen[f]['lowered'])} | {fmt(seen[f]['compiled'])} |")
  return lines


def write(out: Path, result: dict) -> None:
  """client_conv.json (everything), client_conv.csv (the rows), client_conv.md
  and client_conv.png (ms per layer against the channels, one line per
  formulation and precision, at the first batch and K)."""
  rows = result["rows"]
  (out / "client_conv.json").write_text(json.dumps(result, indent=2))
  if rows:
    bench_io.write_tables(out, "client_conv", result, rows, drop=("ops",))
    b, k = rows[0]["batch"], rows[0]["clients"]
    bench_io.line_plot(out / "client_conv.png",
                       [dict(r, line=f"{r['form']}, {r['precision']}") for r in rows
                        if r["batch"] == b and r["clients"] == k and r["ms"] is not None],
                       "line", "channels", "ms", xlabel="channels (stage 1..4)",
                       ylabel="ms per layer, forward + both gradients",
                       title=f"one 3x3 layer, per-client weights, K={k}, batch {b}, "
                             f"{result['backend']}", ylog=True)
  forms = result["args"]["forms"].split(",")
  head = [f"# Per-client convolution, {result['device_kind'] or result['device']} "
          f"({result['backend']}, jax {result['jax']})", "",
          f"One 3x3 layer, forward + input and kernel gradients; median of "
          f"{result['args']['reps']} x {result['args']['iters']} calls. Agreement with "
          f"`separate` (largest relative difference, float32): "
          + ", ".join(f"{k} {v:.1e}" for k, v in result["agreement"].items()) + ".", ""]
  (out / "client_conv.md").write_text("\n".join(head + markdown(result["rows"], forms)) + "\n")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--stages", default="1,2,3,4")
  p.add_argument("--ks", default="16")
  p.add_argument("--batches", default="32,128")
  p.add_argument("--precisions", default="float32,bfloat16")
  p.add_argument("--forms", default=",".join(FORMS), help=f"of {', '.join(FORMS)}; the first is the reference")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--iters", type=int, default=10)
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = lambda s: print(s, flush=True)
  from bench_throughput import device_info
  result = {**device_info(), "args": vars(args), "agreement": check(), "rows": []}

  def on_shape(rows):
    result["rows"] = rows
    write(out, result)
  measure(args, log, on_shape)
  write(out, result)
  log(f"[client_conv] wrote {out}/client_conv.json and client_conv.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
