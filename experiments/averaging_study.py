"""Why do Averaging's exits fall below each client trained alone? The suspects, one at a time.

    python experiments/averaging_study.py --out runs/averaging_study            # ~25 min here
    python experiments/averaging_study.py --out DIR --seeds 0 --set rounds=2     # a quick look

Every variant is the same short CIFAR-10 run (``BASE``: width 0.125, 5,000
training images, the whole test set, three clients cut at 3, 5, 7, IID, about
one pass over a client's data per round) with one thing changed:

  averaging            Hetero-SplitEE Averaging as configured by default
  averaging-reset      client optimiser state reset every round (``client_state=reset``):
                       no momentum carried across an aggregation
  alone                no aggregation (each client keeps its own whole network)
  alone-reset          the same with ``client_state=reset``
  homogeneous-3        every client at cut 3: averaging between equal objectives only
  averaging-every2     aggregation every 2 rounds: the last round's exits are
                       measured before (round R-1) and after (round R) an aggregation

and, on the final state of ``averaging``, batch-norm statistics recomputed
for the averaged weights on the training images (``bn-recomputed``), against
the averaged running statistics the aggregation writes.

Aggregation weights (data sizes) are equal up to one image in an IID split of
three clients, and each cut has one client, so no exit head is averaged:
neither can move these runs, and neither gets a variant.

Outputs in --out: ``study.json`` (every variant's test accuracies per seed
and evaluated round) and ``study.md`` (means ± std over seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsee_jax import config as config_lib  # noqa: E402
from hsee_jax import data as data_lib  # noqa: E402
from hsee_jax import evaluation, sweep  # noqa: E402
from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax.config import Config  # noqa: E402

BASE = Config(name="study", dataset="cifar10", width=0.125, train_subset=5000, test_subset=0,
              cuts=(3, 5, 7), rounds=8, batch_size=32, lr=0.05, checkpoint_every=0)
VARIANTS = {
    "averaging": {},
    "averaging-reset": {"client_state": "reset"},
    "alone": {"aggregate_every": 10**9},
    "alone-reset": {"aggregate_every": 10**9, "client_state": "reset"},
    "homogeneous-3": {"cuts": (3, 3, 3)},
    "averaging-every2": {"aggregate_every": 2},
}


def _accuracies(test: dict) -> dict:
  return {"exit_acc": [c["exit_acc"]["mean"] for c in test["cuts"]],
          "full_acc": [c["full_acc"]["mean"] for c in test["cuts"]],
          "cuts": [c["cut"] for c in test["cuts"]]}


def run_variant(cfg: Config, dataset, log=print) -> dict:
  """Train ``cfg`` round by round (the keys of ``hsee train``); test
  accuracies after the last two rounds and after the middle one."""
  _, sim = train_lib.build(cfg, dataset)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
  state = sim.init_state(init_key)
  evaluated = {}
  t0 = time.time()
  for rnd in range(cfg.rounds):
    state, _, _ = sim.run_round(state, rnd, train_key)
    if rnd + 1 in {cfg.rounds // 2, cfg.rounds - 1, cfg.rounds}:
      test = evaluation.evaluate(sim.net, sim.fleet, sim.algorithm.eval_models(state), dataset,
                                 (0.0,), 500)
      evaluated[rnd + 1] = _accuracies(test)
  out = {"rounds": evaluated, "seconds": time.time() - t0}
  if cfg.strategy == "averaging" and cfg.aggregate_every == 1:  # static_bn=True's evaluation
    _, bn_sim = train_lib.build(dataclasses.replace(cfg, static_bn=True), dataset)
    out["bn_recomputed"] = _accuracies(evaluation.evaluate(
        sim.net, sim.fleet, bn_sim.algorithm.eval_models(state), dataset, (0.0,), 500))
  return out


def study(out: Path, seeds, overrides=(), variants=None, log=print) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  base = config_lib.override(BASE, list(overrides))
  dataset = data_lib.load_dataset(base)
  results = {"base": base.to_dict(), "seeds": list(seeds), "variants": {}}
  for name in variants or VARIANTS:
    per_seed = []
    for s in seeds:
      cfg = dataclasses.replace(base, seed=s, **VARIANTS[name])
      r = run_variant(cfg, dataset, log)
      per_seed.append(r)
      last = r["rounds"][cfg.rounds]
      log(f"[study] {name} seed {s}: exit_acc {' / '.join(f'{a:.3f}' for a in last['exit_acc'])}"
          f", full_acc {np.mean(last['full_acc']):.3f} ({r['seconds']:.0f} s)")
    results["variants"][name] = per_seed
    (out / "study.json").write_text(json.dumps(results, indent=2))
  (out / "study.md").write_text(markdown(results))
  log(f"[study] wrote {out / 'study.md'}")
  return results


def _ms(values) -> str:
  m, s = sweep.mean_std(values)
  return f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}"


def markdown(results: dict) -> str:
  base = results["base"]
  rounds = base["rounds"]
  md = ["# Averaging's exits against alone: the suspects", "",
        f"CIFAR-10, width {base['width']}, {base['train_subset']} training images, the whole "
        f"test set, cuts {tuple(base['cuts'])}, {rounds} rounds, seeds "
        f"{', '.join(map(str, results['seeds']))} (mean ± std over seeds).", "",
        "| variant | round | `exit_acc` per cut | mean `exit_acc` | mean `full_acc` |",
        "| --- | --- | --- | --- | --- |"]
  for name, per_seed in results["variants"].items():
    rows = [(str(r), [p["rounds"][r] for p in per_seed]) for r in sorted(per_seed[0]["rounds"],
                                                                         key=int)]
    if "bn_recomputed" in per_seed[0]:
      rows.append((f"{rounds}, bn-recomputed", [p["bn_recomputed"] for p in per_seed]))
    for label, accs in rows:
      cuts = accs[0]["cuts"]
      per_cut = " / ".join(_ms([a["exit_acc"][j] for a in accs]) for j in range(len(cuts)))
      md.append(f"| {name} | {label} | {per_cut} | {_ms([np.mean(a['exit_acc']) for a in accs])} "
                f"| {_ms([np.mean(a['full_acc']) for a in accs])} |")
  return "\n".join(md) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  args = p.parse_args(argv)
  try:
    study(Path(args.out), sweep.parse_seeds(args.seeds), args.overrides,
          [v for v in args.variants.split(",") if v])
  except (config_lib.ConfigError, data_lib.DataError, train_lib.RunError, KeyError) as e:
    print(f"averaging_study: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
