"""The simulated clock of a grid's runs, without training them.

Who takes part in a round and what it costs on the simulated clock depend on
the config, the fleet and the seed only (``fleet.participants``), never on
the training, so a grid can be priced before (or after) it is run:

    python experiments/price_grid.py --scale evidence --runs hsee-averaging,hsee-sequential
    python experiments/price_grid.py --scale iot-more --runs deadline-by-tier --seeds 0,1,2

prints, per run, the mean simulated seconds, bytes, missed and unused
clients per round (means over ``--seeds``), the first seed's simulated time
at each evaluated round and each cut's share of client-rounds trained, and
writes them to ``--out`` as JSON when given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402

from hsee_jax import train  # noqa: E402
from hsee_jax.data import load_dataset  # noqa: E402


def price(cfg) -> dict:
  """``cfg``'s every round on the simulated clock: seconds, bytes, the
  sampled clients that missed the deadline and those not needed, and how
  many clients of each cut trained (the run's own seed)."""
  data = load_dataset(cfg)
  _, sim = train.build(cfg, data)
  key = jax.random.split(jax.random.PRNGKey(cfg.seed))[1]   # the training key (train.train's)
  cohorts = [sim.cohort(r, key) for r in range(cfg.rounds)]
  trained = {int(c): int(sum(np.sum(co.cuts == c) for co in cohorts)) for c in sim.fleet.groups}
  return {"sim_seconds": [c.sim_seconds for c in cohorts], "bytes": [c.bytes_sent for c in cohorts],
          "dropped": [len(c.dropped) for c in cohorts], "unused": [len(c.unused) for c in cohorts],
          "trained_share_per_cut": {c: n / (len(sim.fleet.groups[c]) * cfg.rounds)
                                    for c, n in trained.items()},
          "eval_rounds": list(range(cfg.eval_every, cfg.rounds + 1, cfg.eval_every))}


def summary(per_seed: list[dict]) -> dict:
  """Means over seeds per round, and the first seed's simulated time at each evaluated round."""
  first = per_seed[0]
  return {"sim_seconds_per_round": float(np.mean([np.mean(p["sim_seconds"]) for p in per_seed])),
          "bytes_per_round": float(np.mean([np.mean(p["bytes"]) for p in per_seed])),
          "dropped_per_round": float(np.mean([np.mean(p["dropped"]) for p in per_seed])),
          "unused_per_round": float(np.mean([np.mean(p["unused"]) for p in per_seed])),
          "first_seed_sim_seconds_at_eval": [float(np.sum(first["sim_seconds"][:r]))
                                             for r in first["eval_rounds"]],
          "trained_share_per_cut": first["trained_share_per_cut"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scale", default="evidence", choices=sorted(reproduce.SCALES))
  p.add_argument("--dataset", default="cifar10")
  p.add_argument("--runs", default="", help="comma list of run names (default: every run)")
  p.add_argument("--seeds", default="0", help="comma list of seeds (means over them)")
  p.add_argument("--set", dest="overrides", action="append", default=[])
  p.add_argument("--out", help="a JSON file for the figures")
  args = p.parse_args(argv)
  wanted = [r for r in args.runs.split(",") if r]
  seeds = [int(x) for x in args.seeds.split(",")]
  out = {}
  for name, cfg in reproduce.grid(args.dataset, args.scale, args.overrides):
    if wanted and name not in wanted:
      continue
    out[name] = summary([price(dataclasses.replace(cfg, seed=s)) for s in seeds])
    f = out[name]
    print(f"{name}: {f['sim_seconds_per_round']:.2f} simulated s per round, "
          f"{f['bytes_per_round'] / 1e6:.2f} MB per round, {f['dropped_per_round']:.2f} dropped "
          f"and {f['unused_per_round']:.2f} unused per round; seed {seeds[0]} at the evaluated "
          f"rounds: {' / '.join(f'{t:.0f}' for t in f['first_seed_sim_seconds_at_eval'])} s; "
          f"trained share per cut: "
          f"{' / '.join(f'{v:.0%}' for v in f['trained_share_per_cut'].values())}", flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
