"""The report of a grid (``experiments/reproduce.py``): verdicts, tables and
plots, generic code that no grid edits. :func:`write_outputs` writes
``results.csv``, ``results.md``, ``results.json`` and the plots; the grid's
``REPORT`` names the sections and plots it adds to the common ones
(:data:`report.tables.SECTIONS`, :data:`report.plots.PLOTS`)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from report import plots, tables
from report.verdicts import convergence, cut_rows, goal, server_costs, verdicts


def rows_of(results: dict) -> list[dict]:
  """``results.csv``: one row per dataset, run and cut."""
  rows = []
  for ds_name, ds in results["datasets"].items():
    for name, per_seed in ds["runs"].items():
      first = per_seed[0]
      for c in cut_rows(per_seed):
        rows.append({"dataset": ds_name, "run": name, "strategy": first["config"]["strategy"],
                     "client": c["client"], "cut": c["cut"], "seeds": len(per_seed),
                     "exit_accuracy": round(c["exit_acc"][0], 4),
                     "exit_accuracy_std": round(c["exit_acc"][1], 4),
                     "full_path_accuracy": round(c["full_acc"][0], 4),
                     "full_path_accuracy_std": round(c["full_acc"][1], 4),
                     "rounds": first["summary"]["rounds"],
                     "wall_seconds": round(float(np.mean([r["wall_seconds"] for r in per_seed])), 1),
                     "simulated_seconds": round(sum(ds["simulated"][name]), 1)})
  return rows


def write_outputs(results: dict, out: Path, grid, log=print) -> None:
  """The tables, verdicts (on ``grid.CLAIMS``) and plots of ``results``."""
  rows = rows_of(results)
  for ds in results["datasets"].values():
    ds["verdicts"] = verdicts(ds["runs"], grid.CLAIMS)
    ds["convergence"] = convergence(ds["runs"])
    ds["server_costs"] = server_costs(ds)
    goal_spec = getattr(grid, "GOAL", None)
    ds["goal"] = goal(ds["verdicts"], dict(grid.REPORT).get("goal", {}).get("runs", ()),
                      goal_spec["claims"]) if goal_spec else []
  if rows:
    with open(out / "results.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  (out / "results.md").write_text(tables.markdown(results, rows, grid))
  (out / "results.json").write_text(json.dumps(
      {k: v for k, v in results.items() if k != "datasets"} | {"rows": rows} | {
          "claims": {name: {k: ds[k] for k in ("verdicts", "convergence", "server_costs", "goal")}
                     for name, ds in results["datasets"].items()}}, indent=2))
  plots.plots(results, out, grid, log)
  log(f"[reproduce] wrote {out}/results.csv, results.md and plots")
