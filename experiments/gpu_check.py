"""The GPU check: throughput in float32 and bfloat16 against fair PyTorch loops,
bfloat16's accuracy against float32, and one layer with per-client weights
four ways, in one command of about 8 minutes of an H200.

    mkdir -p data && cp -r ../shared/data/cifar10 data/    # data/ is git-ignored
    python3 experiments/gpu_check.py --out OUT --time-limit 420   # the device tool: carry=["data"]

Throughput (``bench_throughput.measure``; ResNet-18 width 1.0, one Averaging
round, cuts 3/5/7, 3 local steps): for each batch (32, 128) and precision
(float32, bfloat16), K = 8 and 16 clients, the hsee_jax executions ``loop``
and ``vmap``; with each batch's first precision the PyTorch columns ``torch``
(the first reference: eager float32, a host read per step), ``torch_fair``
(no host read inside a round, channels_last, float32) and ``torch_amp``
(torch_fair under autocast bfloat16). Then why client-parallel loses
(experiments/client_conv.py, ``--layer-stages``, ``--layer-batches``): one
3x3 layer with per-client weights at K = the largest of ``--ks``, in each
precision, as K separate convolutions, as ``vmap`` makes it (grouped
convolutions), and as batched matrix products (im2col, nine shifted
products), with the cuDNN calls XLA chose for each. Then accuracy:
``configs/averaging.py`` for ``--accuracy-rounds`` rounds in float32 and in
bfloat16 at the same seed (on the CIFAR-10 of ``--data-dir``; left out,
said, where there is none).

``mode = auto`` (hsee_jax.engine.AUTO_MODE) is compared with what was
measured: for each batch and precision, the execution the table picks and the
fastest one measured at the largest K. ``--time-limit`` seconds: no section
starts after it (those left are named in the outputs), so a check given a
fixed slot of device time returns what it measured.

Writes OUT/gpu_check.json and OUT/gpu_check.md after every section, so a
check cut short keeps what it measured; a section that fails (out of memory,
say) is recorded in one line under ``errors`` and the next one runs. Both
files carry the issue's goals: bfloat16 at batch 128 against 25% of the
dense bf16 peak, hsee_jax against the fair AMP loop at batch 32 (1.5x) and
128 (1.2x), bfloat16's accuracy within a point.
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
import client_conv  # noqa: E402
from hsee_jax.checkpoint import first_line  # noqa: E402

GOALS = {"bf16_b128_peak_share": 0.25, "vs_torch_amp_b32": 1.5, "vs_torch_amp_b128": 1.2,
         "bf16_accuracy_points": 1.0}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--ks", default="8,16")
  p.add_argument("--batches", default="32,128", help="of the throughput section ('' for none)")
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
  p.add_argument("--layer-stages", default="1,3",
                 help="ResNet-18 stages for the per-client convolution section ('' for none)")
  p.add_argument("--layer-batches", default="128")
  p.add_argument("--layer-forms", default=",".join(client_conv.FORMS))
  p.add_argument("--time-limit", type=float, default=0.0,
                 help="seconds: start no section after this many (0: no limit)")
  return p


def auto_choices(result: dict) -> list[dict]:
  """For each (batch, precision) measured: what ``mode = auto`` picks on this
  backend and the fastest hsee_jax execution at the largest K."""
  from hsee_jax import engine
  rows = result["rows"]
  k = max((r["clients"] for r in rows), default=None)
  out = []
  for batch, prec in dict.fromkeys((r["batch"], r["precision"]) for r in rows
                                   if r["execution"] in bench.JAX_EXECUTIONS):
    mine = [r for r in rows if r["batch"] == batch and r["precision"] == prec
            and r["clients"] == k and r["execution"] in bench.JAX_EXECUTIONS]
    fastest = max(mine, key=lambda r: r["images_per_s"])
    picked = engine.auto_mode(prec, batch, result["backend"])
    by = {r["execution"]: r["images_per_s"] for r in mine}
    out.append({"batch": batch, "precision": prec, "clients": k, "auto": picked,
                "fastest": fastest["execution"],
                "auto_vs_fastest": by[picked] / fastest["images_per_s"] if picked in by else None})
  return out


def suggested_auto(choices: list[dict], backend: str) -> dict:
  """The ``engine.AUTO_MODE`` entries that ``auto_choices`` measured: per
  precision, the fastest execution at each batch, runs of equal ones merged,
  the last without a bound: ``{(kind, precision): ((largest batch | None, mode), ...)}``."""
  kind = "cpu" if backend == "cpu" else "accelerator"
  table = {}
  for prec in dict.fromkeys(c["precision"] for c in choices):
    pairs = []
    for c in sorted((c for c in choices if c["precision"] == prec), key=lambda c: c["batch"]):
      if pairs and pairs[-1][1] == c["fastest"]:
        pairs[-1] = (c["batch"], c["fastest"])
      else:
        pairs.append((c["batch"], c["fastest"]))
    pairs[-1] = (None, pairs[-1][1])
    table[(kind, prec)] = tuple(pairs)
  return table


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
  result["auto"] = auto_choices(result)
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
  if result["auto"]:
    lines += ["", "`mode = auto` (engine.AUTO_MODE) against the fastest execution measured:", "",
              "| batch | precision | K | auto picks | fastest | auto's images/s / fastest's |",
              "| --- | --- | --- | --- | --- | --- |"]
    for a in result["auto"]:
      ratio = "not measured" if a["auto_vs_fastest"] is None else f"{a['auto_vs_fastest']:.2f}"
      lines.append(f"| {a['batch']} | {a['precision']} | {a['clients']} | {a['auto']} | "
                   f"{a['fastest']} | {ratio} |")
    lines += ["", "The engine.AUTO_MODE entries these figures give (hsee_jax/engine.py):", ""]
    lines += [f"    {key!r}: {pairs!r}," for key, pairs in
              suggested_auto(result["auto"], result["backend"]).items()]
  if result.get("layers"):
    forms = result["args"]["layer_forms"].split(",")
    lines += ["", "One 3x3 layer with per-client weights (experiments/client_conv.py), forward + "
              "both gradients, ms:", ""] + client_conv.markdown(result["layers"], forms)
  if result.get("skipped"):
    lines += ["", f"Not run (--time-limit {result['args']['time_limit']:.0f} s reached): "
              + "; ".join(result["skipped"]) + "."]
  if result.get("errors"):
    lines += ["", "Failed: " + "; ".join(result["errors"]) + "."]
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
  result = {**info, "args": vars(args), "rows": [], "seconds": 0.0, "peak_bf16_flops": peak,
            "skipped": [], "errors": []}

  def may_start(section: str) -> bool:
    if args.time_limit and time.perf_counter() - t0 > args.time_limit:
      result["skipped"].append(section)
      log(f"[gpu_check] time limit: not running {section}")
      return False
    return True

  def guarded(section: str, fn) -> None:
    """``fn()``; an error (out of memory, a library missing) is recorded as
    one line under ``errors`` and the check goes on with the next section."""
    try:
      fn()
    except Exception as e:
      result["errors"].append(f"{section}: {first_line(e)}")
      log(f"[gpu_check] {section} failed: {result['errors'][-1]}")
    result["seconds"] = time.perf_counter() - t0
    write(out, result)

  torch_execs = bench.usable_executions([e for e in args.torch.split(",") if e], log)
  for batch in [int(b) for b in args.batches.split(",") if b]:   # '': no throughput section
    for i, prec in enumerate(args.precisions.split(",")):
      name = f"throughput batch {batch} {prec}"
      if not may_start(name):
        continue
      execs = bench.usable_executions(args.executions.split(","), log) + \
          (torch_execs if i == 0 else [])
      section = types.SimpleNamespace(ks=args.ks, width=args.width, batch=batch, steps=args.steps,
                                      reps=args.reps, precision=prec)
      log(f"[gpu_check] batch {batch}, {prec}: {', '.join(execs)}")
      guarded(name, lambda: result["rows"].extend(bench.measure(section, execs, log)))
  if args.layer_stages and may_start("per-client convolution layers"):
    layers = types.SimpleNamespace(
        width=args.width, stages=args.layer_stages, ks=max(map(int, args.ks.split(","))),
        batches=args.layer_batches, precisions=args.precisions, forms=args.layer_forms,
        reps=args.reps, iters=10)

    def on_shape(rows):
      result["layers"] = rows
      result["seconds"] = time.perf_counter() - t0
      write(out, result)
    guarded("per-client convolution layers", lambda: client_conv.measure(
        layers, log, on_shape, lambda: may_start("per-client convolution layers, the rest")))
  if args.accuracy_rounds and may_start("accuracy"):
    if Path(args.data_dir).is_dir():
      guarded("accuracy", lambda: result.update(accuracy=accuracy(args, log)))
    else:
      result["accuracy_skipped"] = f"no CIFAR-10 at {args.data_dir}"
  result["seconds"] = time.perf_counter() - t0
  write(out, result)
  log(f"[gpu_check] {result['seconds']:.0f}s; wrote {out}/gpu_check.json and gpu_check.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
