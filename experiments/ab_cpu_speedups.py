"""A/B measurements behind three CPU speed-ups, written to ab.json.

    python experiments/ab_cpu_speedups.py --out runs/ab_cpu_speedups

* tree helpers: slicing one client out of a stacked client state and stacking
  K states, eagerly (one dispatch per leaf) against the jitted helpers of
  ``hsee_jax.engine`` (one dispatch per tree);
* ``models.materialize``: Averaging rounds with it and with it replaced by the
  identity, built in one process and interleaved round by round (the order
  alternates), for each ``--modes`` execution; also the largest difference
  between the two final states (dividing by 1.0 is exact, but XLA may fuse,
  and so round, the surrounding ops differently).
* ``models.depthwise_conv3x3`` (MobileNetV2's depthwise convolutions as
  shifted multiply-adds) against XLA's grouped convolution: each depthwise
  layer of MobileNetV2 alone (forward + backward, interleaved), and
  MobileNetV2 Averaging rounds with either, as for ``materialize``;
* ``engine.ClientRunner.chunk_program`` (prepare fused into the update's
  first call and finish into its last, the per-client store donated)
  against the same pieces as separate compiled calls (:func:`unfused_chunk_program`),
  Averaging rounds as for ``materialize``.
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
from hsee_jax.strategies.parts import stack_copies  # noqa: E402


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
  part = stack_copies(strategies.client_server_parts(run.state, cut, run.strategy.ctx.tx), k)
  parts = [engine.tree_slice(part, i) for i in range(k)]
  return {"leaves": len(jax.tree.leaves(part)), "clients": k,
          "slice_eager_ms": _ms(lambda: engine.tree_slice.__wrapped__(part, 1)),
          "slice_jit_ms": _ms(lambda: engine.tree_slice(part, 1)),
          "stack_eager_ms": _ms(lambda: engine.tree_stack.__wrapped__(parts)),
          "stack_jit_ms": _ms(lambda: engine.tree_stack(parts))}


def grouped_conv3x3(x, kernel, strides: int = 1):
  """XLA's depthwise convolution: what ``models.depthwise_conv3x3`` replaces on CPU."""
  return jax.lax.conv_general_dilated(x, kernel, (strides, strides), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


def depthwise_layers(args) -> list[dict]:
  """Forward + backward of every distinct depthwise layer of MobileNetV2 (CIFAR
  form, ``--width``, ``--batch``), both ways, interleaved (median of 5)."""
  net = models.network("mobilenet_v2", 10, args.width)
  shapes = []
  for k in range(2, net.num_units):  # the inverted-residual blocks
    features, strides, expand = net._blocks()[k - 2]
    h, w, c = net.input_shape(k, (32, 32, 3))
    if (h, c * expand, strides) not in shapes:
      shapes.append((h, c * expand, strides))
  rows = []
  for h, c, strides in shapes:
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, h, h, c))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, c))
    fns = {name: jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k, strides) ** 2), (0, 1)))
           for name, f in (("grouped", grouped_conv3x3), ("shifted", models.depthwise_conv3x3))}
    times = {name: [] for name in fns}
    for _ in range(5):
      for name, fn in fns.items():
        times[name].append(_ms(lambda: fn(x, kernel), reps=5))
    rows.append({"hw": h, "channels": c, "strides": strides,
                 **{f"{name}_ms": statistics.median(t) for name, t in times.items()}})
  return rows


def unfused_chunk_program(runner, prepare, finish, constrain=None):
  """A chunk as separate compiled calls: prepare; the runner (init, the
  steps, final); finish (the store donated)."""
  begin, end = jax.jit(prepare), jax.jit(finish, donate_argnums=2)
  return lambda common, read, owned, xs: end(runner(common, begin(read, owned), xs), read, owned)


def rounds_ab(mode: str, args, name: str, replacement, model: str = "resnet18",
              owner=models) -> dict:
  """Rounds of the same Averaging benchmark with ``owner.<name>`` as shipped
  (``with``) and replaced by ``replacement`` (``without``)."""
  real = getattr(owner, name)
  runs = {}
  try:
    for on in (False, True):  # the choice is read while tracing, i.e. in the first round
      setattr(owner, name, real if on else replacement)
      strategies.clear_program_cache()  # each run builds (and traces) its own programs
      runs[on] = JaxExecution(mode, args.k, argparse.Namespace(**{**vars(args), "model": model}))
      runs[on].round()
  finally:
    setattr(owner, name, real)
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
  separate = all(runs[False].strategy.runners[c] is not runs[True].strategy.runners[c]
                 for c in runs[True].strategy.runners)
  return {"mode": mode, "clients": args.k, "model": model, "separate_programs": separate,
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
  p.add_argument("--parts", default="tree_helpers,materialize,depthwise_layers,depthwise,fused",
                 help="which A/Bs: depthwise_layers = one layer at a time, depthwise = rounds")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  parts, modes = args.parts.split(","), args.modes.split(",")
  result = {"jax": jax.__version__, "backend": jax.default_backend(), "args": vars(args)}
  if "tree_helpers" in parts:
    result["tree_helpers"] = t = tree_helpers(args)
    print(f"[ab] tree_slice {t['slice_eager_ms']:.2f} -> {t['slice_jit_ms']:.2f} ms, "
          f"tree_stack of {t['clients']} {t['stack_eager_ms']:.2f} -> {t['stack_jit_ms']:.2f} ms "
          f"({t['leaves']} leaves)")
  if "materialize" in parts:
    result["materialize"] = [rounds_ab(m, args, "materialize", lambda x: x) for m in modes]
  if "depthwise_layers" in parts:
    result["depthwise_layers"] = depthwise_layers(args)
    for r in result["depthwise_layers"]:
      print(f"[ab] depthwise {r['hw']}x{r['hw']}x{r['channels']} stride {r['strides']}: grouped conv "
            f"{r['grouped_ms']:.2f} ms, shifted {r['shifted_ms']:.2f} ms (forward + backward)")
  if "depthwise" in parts:
    result["depthwise"] = [rounds_ab(m, args, "depthwise_conv3x3", grouped_conv3x3, "mobilenet_v2")
                           for m in modes]
  if "fused" in parts:
    result["fused"] = [rounds_ab(m, args, "chunk_program", unfused_chunk_program, owner=engine.ClientRunner)
                       for m in modes]
  for part in ("materialize", "depthwise", "fused"):
    for r in result.get(part, []):
      print(f"[ab] {part}, {r['model']} {r['mode']} K={r['clients']}: {r['images_per_s_without']:.0f} -> "
            f"{r['images_per_s_with']:.0f} images/s, states differ by at most "
            f"{r['states_max_abs_difference']:.2g}")
  (out / "ab.json").write_text(json.dumps(result, indent=2))
  print(f"[ab] wrote {out}/ab.json")


if __name__ == "__main__":
  main()
