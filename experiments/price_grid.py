"""The simulated clock of a grid's runs, without training them.

Who takes part in a round and what it costs on the simulated clock depend on
the config, the fleet and the seed only (``fleet.participants``), never on
the training, so a grid can be priced before (or after) it is run:

    python experiments/price_grid.py --scale evidence --runs hsee-averaging,hsee-sequential

prints, per run (seed 0 unless ``--seed``), the mean simulated seconds and
bytes per round over the run's rounds, and writes them to ``--out`` as JSON
when given.
"""
from __future__ import annotations

import argparse
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
  """Mean simulated seconds and bytes per round of ``cfg`` (every round's cohort)."""
  data = load_dataset(cfg)
  _, sim = train.build(cfg, data)
  key = jax.random.PRNGKey(cfg.seed)
  cohorts = [sim.cohort(r, key) for r in range(cfg.rounds)]
  return {"sim_seconds_per_round": float(np.mean([c.sim_seconds for c in cohorts])),
          "bytes_per_round": float(np.mean([c.bytes_sent for c in cohorts])),
          "rounds": cfg.rounds}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scale", default="evidence", choices=sorted(reproduce.SCALES))
  p.add_argument("--dataset", default="cifar10")
  p.add_argument("--runs", default="", help="comma list of run names (default: every run)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", dest="overrides", action="append", default=[])
  p.add_argument("--out", help="a JSON file for the figures")
  args = p.parse_args(argv)
  wanted = [r for r in args.runs.split(",") if r]
  out = {}
  for name, cfg in reproduce.grid(args.dataset, args.scale, args.overrides + [f"seed={args.seed}"]):
    if wanted and name not in wanted:
      continue
    out[name] = price(cfg)
    print(f"{name}: {out[name]['sim_seconds_per_round']:.2f} simulated s per round, "
          f"{out[name]['bytes_per_round'] / 1e6:.2f} MB per round", flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
