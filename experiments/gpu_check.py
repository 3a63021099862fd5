"""The GPU check: throughput in float32 and bfloat16 against fair PyTorch loops,
and bfloat16's accuracy against float32, in one command of at most 8 minutes
of an H200.

    mkdir -p data && cp -r ../shared/data/cifar10 data/    # data/ is git-ignored
    python3 experiments/gpu_check.py --out OUT              # the device tool: carry=["data"]

Throughput (``bench_throughput.measure``; ResNet-18 width 1.0, one Averaging
round, cuts 3/5/7, 3 local steps): for each batch (32, 128) and precision
(float32, bfloat16), K = 8 and 16 clients, the hsee_jax executions ``loop``
and ``vmap``; with each batch's first precision the PyTorch columns ``torch``
(the first reference: eager float32, a host read per step), ``torch_fair``
(no host read inside a round, channels_last, float32) and ``torch_amp``
(torch_fair under autocast bfloat16). Then accuracy:
``configs/averaging.py`` for ``--accuracy-rounds`` rounds in float32 and in
bfloat16 at the same seed (on the CIFAR-10 of ``--data-dir``; left out,
said, where there is none).

Writes OUT/gpu_check.json and OUT/gpu_check.md after every section, so a
check cut short keeps what it measured, and the issue's goals: bfloat16 at
batch 128 against 25% of the dense bf16 peak, hsee_jax against the fair AMP
loop at batch 32 (1.5x) and 128 (1.2x), bfloat16's accuracy within a point.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_throughput as bench  # noqa: E402

GOALS = {"bf16_b128_peak_share": 0.25, "vs_torch_amp_b32": 1.5, "vs_torch_amp_b128": 1.2,
         "bf16_accuracy_points": 1.0}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--ks", default="8,16")
  p.add_argument("--batches", default="32,128")
  p.add_argument("--precisions", default="float32,bfloat16")
  p.add_argument("--executions", default="loop,vmap")
  p.add_argument("--torch", default="torch,torch_fair,torch_amp",
                 help="PyTorch columns, measured once per batch ('' for none)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--accuracy-rounds", type=int, default=3, help="0: no accuracy section")
  p.add_argument("--accuracy-set", action="append", default=[],
                 help="config override for the accuracy runs (tests shrink them)")
  p.add_argument("--data-dir", default="data/cifar10")
  return p


def best(rows, execution_prefix, batch, k, precision=None):
  """The fastest row of the executions named ``execution_prefix``* (hsee_jax's
  when the prefix is ``hsee``) at ``batch`` and ``k``."""
  pick = [r for r in rows if r["batch"] == batch and r["clients"] == k
          and (r["execution"] in bench.JAX_EXECUTIONS if execution_prefix == "hsee"
               else r["execution"] == execution_prefix)
          and (precision is None or r["precision"] == precision)]
  return max(pick, key=lambda r: r["images_per_s"], default=None)


def goals(result: dict) -> list[dict]:
  """The issue's goals from what was measured (None where not measured)."""
  rows, k = result["rows"], max(map(int, result["args"]["ks"].split(",")))
  out = []
  peak = result.get("peak_bf16_flops")
  r = best(rows, "hsee", 128, k, "bfloat16")
  out.append({"goal": f"bfloat16, batch 128, K={k}: share of the dense bf16 peak",
              "target": GOALS["bf16_b128_peak_share"],
              "measured": (r["achieved_tflops"] * 1e12 / peak) if (r and peak) else None,
              "by": r and r["execution"]})
  for b, key in ((32, "vs_torch_amp_b32"), (128, "vs_torch_amp_b128")):
    mine, theirs = best(rows, "hsee", b, k), best(rows, "torch_amp", b, k)
    out.append({"goal": f"batch {b}, K={k}: hsee_jax's best against torch_amp",
                "target": GOALS[key],
                "measured": mine["images_per_s"] / theirs["images_per_s"] if mine and theirs else None,
                "by": mine and f"{mine['execution']} {mine['precision']}"})
  acc = result.get("accuracy")
  out.append({"goal": "configs/averaging.py: bfloat16 full-path accuracy within a point of float32",
              "target": GOALS["bf16_accuracy_points"],
              "measured": abs(acc["bfloat16"] - acc["float32"]) * 100 if acc else None, "by": ""})
  for g in out:
    g["met"] = None if g["measured"] is None else (
        g["measured"] <= g["target"] if "accuracy" in g["goal"] else g["measured"] >= g["target"])
  return out


def write(out: Path, result: dict) -> None:
  result["goals"] = goals(result)
  (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
  lines = [f"# GPU check: {result['device_kind'] or result['device']} ({result['backend']}, "
           f"jax {result['jax']})", "",
           f"ResNet-18 width {result['args']['width']}, one Averaging round of "
           f"{result['args']['steps']} local steps per client, cuts 3/5/7; median of "
           f"{result['args']['reps']} rounds; {result['seconds']:.0f} s in all.", "",
           "| batch | K | execution | precision | images/s | s/round | compile s | TFLOP/s | MFU (bf16 peak) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["rows"]:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "–"
    lines.append(f"| {r['batch']} | {r['clients']} | {r['execution']} | {r['precision']} | "
                 f"{r['images_per_s']:,.0f} | {r['seconds_per_round']:.3f} | "
                 f"{r['compile_seconds']:.1f} | {r['achieved_tflops']:.1f} | {mfu} |")
  if result.get("accuracy"):
    a = result["accuracy"]
    lines += ["", f"Accuracy, configs/averaging.py, {a['rounds']} rounds, seed 0: full path "
              f"float32 {a['float32']:.4f}, bfloat16 {a['bfloat16']:.4f}; seconds "
              f"{a['seconds']['float32']:.0f} / {a['seconds']['bfloat16']:.0f}."]
  elif result.get("accuracy_skipped"):
    lines += ["", f"Accuracy: not measured ({result['accuracy_skipped']})."]
  lines += ["", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
  for g in result["goals"]:
    m = "–" if g["measured"] is None else f"{g['measured']:.2f}"
    lines.append(f"| {g['goal']} | {g['target']} | {m} {g['by'] or ''} | "
                 f"{'–' if g['met'] is None else 'yes' if g['met'] else 'no'} |")
  (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def accuracy(args, log) -> dict:
  """``configs/averaging.py`` for a few rounds in each precision, same seed."""
  from hsee_jax import config as config_lib
  from hsee_jax import train as train_lib
  base = config_lib.load(Path(__file__).resolve().parents[1] / "configs" / "averaging.py",
                         [f"rounds={args.accuracy_rounds}", f"eval_every={args.accuracy_rounds}",
                          "checkpoint_every=0", f"data_dir={args.data_dir}"] + args.accuracy_set)
  res = {"rounds": args.accuracy_rounds, "seconds": {}}
  for prec in ("float32", "bfloat16"):
    cfg = config_lib.override(base, [f"precision={prec}"])
    t0 = time.perf_counter()
    summary = train_lib.train(cfg, Path(args.out) / "runs" / prec, overwrite=True, log=log)
    res["seconds"][prec] = time.perf_counter() - t0
    res[prec] = summary["test"]["mean_full_acc"]
    log(f"[gpu_check] accuracy {prec}: full path {res[prec]:.4f} in {res['seconds'][prec]:.0f}s")
  return res


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = lambda s: print(s, flush=True)
  t0 = time.perf_counter()
  info = bench.device_info()
  peak = next((v[0] for k, v in bench.PEAK_FLOPS.items() if k in info["device_kind"]), None)
  result = {**info, "args": vars(args), "rows": [], "seconds": 0.0, "peak_bf16_flops": peak}
  torch_execs = bench.usable_executions([e for e in args.torch.split(",") if e], log)
  for batch in map(int, args.batches.split(",")):
    for i, prec in enumerate(args.precisions.split(",")):
      execs = bench.usable_executions(args.executions.split(","), log) + \
          (torch_execs if i == 0 else [])
      section = types.SimpleNamespace(ks=args.ks, width=args.width, batch=batch, steps=args.steps,
                                      reps=args.reps, precision=prec)
      log(f"[gpu_check] batch {batch}, {prec}: {', '.join(execs)}")
      result["rows"] += bench.measure(section, execs, log)
      result["seconds"] = time.perf_counter() - t0
      write(out, result)
  if args.accuracy_rounds:
    if Path(args.data_dir).is_dir():
      result["accuracy"] = accuracy(args, log)
    else:
      result["accuracy_skipped"] = f"no CIFAR-10 at {args.data_dir}"
  result["seconds"] = time.perf_counter() - t0
  write(out, result)
  log(f"[gpu_check] {result['seconds']:.0f}s; wrote {out}/gpu_check.json and gpu_check.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
