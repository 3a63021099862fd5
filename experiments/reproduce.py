"""Reproduce the paper's experiments: the grid, the baselines, tables, verdicts and plots.

    python experiments/reproduce.py --scale evidence --out runs/evidence     # the claims, this CPU
    python experiments/reproduce.py --scale cpu --out runs/reproduce         # the short grid
    python experiments/reproduce.py --scale gpu --out runs/gpu               # paper scale, 8 min of a GPU
    python experiments/reproduce.py --scale paper --out runs/paper           # 200 rounds, an accelerator
    python experiments/reproduce.py --datasets cifar10,cifar100,stl10 --seeds 0,1,2 ...
    python experiments/reproduce.py --datasets imagefolder --data-dir imagefolder=/my/data ...

Each scale trains one grid, a file of data under ``experiments/grids/``
(its runs, the scales it is trained at, the claims it is judged on and the
report's sections): ``baseline`` (scales cpu, paper: the paper's
baselines), ``evidence`` (the runs that test each claim of PAPER.md),
``variants``, ``variants-more`` and ``variants-user`` (the exit-aware
variants and two methods written as user files, against plain Averaging;
they can share an ``--out`` with ``--resume``), ``iot`` and ``iot-more``
(participation rules and link settings on a 20-client fleet with device
speeds), ``gpu`` (the paper's scale for one seed). The verdicts, tables and
plots are generic code (``experiments/report/``).

Every run of the grid is trained for each of ``--seeds`` through the sweep
machinery (``hsee_jax.sweep``: the seeds of a run, and runs that differ only in
program inputs, share their compiled programs); each run loads its own data
(the seed's training subset), so runs of one seed see the same images and,
for a split, the same partition. The tables and plots give the mean ±
sample standard deviation over seeds. ``--resume`` keeps the finished runs
of an interrupted grid and trains the others.
Outputs in --out: results.csv, results.md, results.json, plots (PNG), and each
run's directory, ``<dataset>/<run>/seed<s>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hsee_jax import config as config_lib  # noqa: E402
from hsee_jax import sweep  # noqa: E402
from hsee_jax import costs, models, rundir  # noqa: E402
from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax import fleet as fleet_lib  # noqa: E402
from hsee_jax import variants as variants_lib  # noqa: E402
from hsee_jax.config import Config  # noqa: E402
from hsee_jax.data import DataError, load_dataset  # noqa: E402

import grids  # noqa: E402
import report  # noqa: E402
from grids.common import BUDGET_SHARES, TIERS  # noqa: E402

SCALES = grids.SCALES


def grid(dataset: str, scale: str, overrides: list[str], data_dir: str = "") -> list[tuple[str, Config]]:
  """The runs of ``scale``'s grid on ``dataset``: (run name, config), the
  overrides applied to every run."""
  fields_of_scale = {k: v for k, v in SCALES[scale].items() if k != "grid"}
  out = []
  for name, fields in grids.of_scale(scale).RUNS.items():
    fields = dict(fields)
    share = fields.pop("data_share", 1.0)
    deadline_share = fields.pop("deadline_share", None)
    if deadline_share is not None:
      fields["deadline_s"] = 1.0   # a placeholder, set from the fleet below
    tiers = dict(TIERS)
    n = len(fields.get("cut_tiers") or fields["cuts"])
    tiers["client_flops_per_s"] = tuple(TIERS["client_flops_per_s"][i % 3] for i in range(n))
    tiers.update({k: fields.pop(k) for k in list(fields) if k in tiers})
    cfg = config_lib.override(Config(name=dataset, dataset=dataset, data_dir=data_dir,
                                     **fields_of_scale, **tiers, **fields), overrides)
    if share != 1.0:
      if not cfg.train_subset:
        raise config_lib.ConfigError(f"run {name}: trains on {share:.2f} of train_subset, "
                                     f"which must be set (> 0)")
      cfg = dataclasses.replace(cfg, train_subset=max(n, round(cfg.train_subset * share)))
    if deadline_share is not None:
      cfg = dataclasses.replace(cfg, deadline_s=_deadline(cfg, deadline_share))
    out.append((name, cfg))
  return out


def _deadline(cfg: Config, share: float) -> float:
  """Simulated seconds in which ``share`` of ``cfg``'s fleet (seed 0's
  draws) finish a round's local steps and the aggregation's transfer."""
  _, sim = train_lib.build(dataclasses.replace(cfg, participation="all", deadline_s=0.0, seed=0))
  done = sim.clock.client_seconds(np.arange(sim.fleet.num_clients), sim.local_steps, True)
  return float(np.round(np.quantile(done, share), 3))


def shrink_note(scale: str) -> str:
  """What the scale keeps of the paper's setting, in one sentence."""
  s = SCALES[scale]
  if scale == "paper":
    return "paper scale: width 1.0, the whole train and test sets, 200 rounds, batch 128"
  images = f"{s['train_subset']} training images (of all)" if s["train_subset"] else \
      "the whole training set"
  return (f"{scale} scale shrinks the paper's setting: width {s['width']} (of 1.0), {images}, "
          f"{s['rounds']} rounds (of 200), batch {s['batch_size']} (of 128); the whole test set")


def _records(run_dir: Path) -> list[dict]:
  return rundir.RunDir(run_dir).read_records()


def run_grid(datasets, scale, out: Path, overrides=(), data_dirs=None, log=print,
             report_only: bool = False, seeds=(0, 1, 2), resume: bool = False) -> dict:
  """Train every run of the grid for every seed (or, ``report_only``, read the
  finished runs in ``out``; ``resume``: keep the finished ones and train the
  others) and write the tables, verdicts and plots."""
  out.mkdir(parents=True, exist_ok=True)
  data_dirs = data_dirs or {}
  seeds = list(seeds)
  log(f"[reproduce] {shrink_note(scale)}; seeds {', '.join(map(str, seeds))}")
  if overrides:
    log(f"[reproduce] overrides for every run: {' '.join(overrides)}")
  results = {"scale": scale, "note": shrink_note(scale), "overrides": list(overrides),
             "seeds": seeds, "datasets": {}, "skipped": {}}
  for ds_name in datasets:
    runs = grid(ds_name, scale, list(overrides), data_dirs.get(ds_name, ""))
    try:
      dataset = load_dataset(runs[0][1])
    except DataError as e:
      log(f"[reproduce] skipping {ds_name}: {e}")
      results["skipped"][ds_name] = str(e)
      continue
    planned = sweep.plan_points([(name, {"run": name}, cfg) for name, cfg in runs], seeds)
    if not report_only:
      with sweep.locked(out / ds_name, log):
        failed = sweep.train_runs(planned, out / ds_name, resume=resume,
                                  log=lambda s: log("    " + s))
      if failed:
        raise train_lib.RunError(f"{len(failed)} run(s) of {ds_name} failed ({', '.join(failed)}; "
                                 f"errors in their metrics.jsonl); the others are kept: "
                                 f"finish with --resume")
    ds_res = results["datasets"][ds_name] = {"runs": {}}
    for name, _ in runs:
      ds_res["runs"][name] = [_load_run(out / ds_name / name / f"seed{s}") for s in seeds]
    _account(ds_res, dataset, runs[0][1])
  report.write_outputs(results, out, grids.of_scale(scale), log)
  return results


def _load_run(run_dir: Path) -> dict:
  if not (run_dir / rundir.SUMMARY).exists():
    raise train_lib.RunError(f"{run_dir} holds no finished run (no summary.json)")
  summary = rundir.read_summary(run_dir)
  return {"config": summary["config"], "summary": summary,
          "wall_seconds": summary["wall_seconds"], "records": _records(run_dir)}


def _account(ds_res: dict, dataset, cfg: Config) -> None:
  """Cost table, budgets -> cuts and simulated time for one dataset's runs."""
  net = models.for_config(cfg, dataset.num_classes)
  table = {r["cut"]: r for r in costs.cost_table(net, dataset.image_shape)}
  classical = {r["cut"]: r for r in costs.cost_table(net, dataset.image_shape, True)}
  ds_res["costs"] = [dict(r, classical_bytes_server_to_client=classical[c]["bytes_server_to_client"])
                     for c, r in table.items()]
  deepest = table[max(table)]["client_train_flops"] * cfg.batch_size
  budgets = [(share * deepest, 0) for share in BUDGET_SHARES]
  ds_res["budgets"] = [dict(c, budget_flops_per_step=b[0], share=share) for c, b, share in
                       zip(costs.choose_cuts(net, dataset.image_shape, budgets, cfg.batch_size),
                           budgets, BUDGET_SHARES)]
  ds_res["simulated"] = _simulate(ds_res["runs"], net, dataset.image_shape)


def _simulate(runs: dict, net, image_shape: tuple) -> dict:
  """Each run's simulated seconds per round (seed 0's): as its records give
  them (``sim_seconds``, the run's own clock), or for runs recorded before
  the records carried them, priced as its config trains
  (``costs.run_cost_table``: the server's gradient, extra exit heads, soft labels)."""
  sim = {}
  for name, per_seed in runs.items():
    r = per_seed[0]
    rounds = [rec for rec in r["records"] if "round" in rec and "train" in rec]
    if rounds and all("sim_seconds" in rec for rec in rounds):
      sim[name] = [rec["sim_seconds"] for rec in rounds]
      continue
    cfg = config_lib.from_dict(r["config"])
    cuts = r["summary"]["cuts"]
    steps = r["summary"]["local_steps"]
    builtin = variants_lib.builtin(cfg)   # runs recorded before the records priced themselves
    cut_table = costs.run_cost_table(cfg, net, image_shape, cuts,
                                     variant=variants_lib.chain(*builtin) if builtin else None)
    per_round = []
    for rec in r["records"]:
      if "round" not in rec or "train" not in rec:
        continue
      per_round.append(costs.simulated_round_seconds(
          cfg.strategy, cuts, cut_table, steps, cfg.batch_size,
          cfg.client_flops_per_s or fleet_lib.DEFAULT_FLOPS_PER_S,
          cfg.server_flops_per_s, cfg.link_bytes_per_s, aggregate=cfg.aggregates_after(rec["round"])))
    sim[name] = per_round
  return sim


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
  p.add_argument("--out", required=True)
  p.add_argument("--datasets", default="cifar10",
                 help="comma list of cifar10, cifar100, stl10, imagefolder; missing data is skipped")
  p.add_argument("--data-dir", action="append", default=[], metavar="DATASET=PATH",
                 help="a dataset's folder: its publisher archive (cifar-10-python.tar.gz, "
                      "cifar-100-python.tar.gz, stl10_binary.tar.gz) or unpacked folder, or "
                      "train.zip/test.zip (repeatable)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field in every run (repeatable)")
  p.add_argument("--seeds", default="0,1,2", help="seeds of every run (comma list; default 0,1,2)")
  p.add_argument("--resume", action="store_true",
                 help="keep the finished runs in --out and train the others")
  p.add_argument("--report-only", action="store_true",
                 help="no training: rebuild the tables and plots from the finished runs in --out")
  args = p.parse_args(argv)
  data_dirs = dict(d.split("=", 1) for d in args.data_dir)
  try:
    run_grid(args.datasets.split(","), args.scale, Path(args.out), args.overrides, data_dirs,
             report_only=args.report_only, seeds=sweep.parse_seeds(args.seeds),
             resume=args.resume)
  except (config_lib.ConfigError, DataError, train_lib.RunError) as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
