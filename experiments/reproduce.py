"""Reproduce the paper's experiments: the grid, the baselines, tables and plots.

    python experiments/reproduce.py --scale cpu --out runs/reproduce           # this machine
    python experiments/reproduce.py --scale paper --out runs/paper             # an accelerator
    python experiments/reproduce.py --datasets cifar10,cifar100,stl10 --seeds 0,1,2 ...
    python experiments/reproduce.py --datasets imagefolder --data-dir imagefolder=/my/data ...

Per dataset, every run of the grid (PAPER.md):
  hsee-averaging    Hetero-SplitEE, Averaging, heterogeneous cuts l = 3, 5, 7
  hsee-sequential   Hetero-SplitEE, Sequential, the same cuts
  homogeneous       split learning with every client at the same cut (l = 5), Averaging
  alone             each client on its own data with its exit head, no aggregation
  classical-split   the server gradient goes back to the client (no exit loss), cuts 3, 5, 7
  central           the uncut ResNet-18 trained on all the data
Every run of the grid is trained for each of ``--seeds`` (default 0,1,2) through
the sweep machinery (``hsee_jax.sweep``: the seeds of a run, and runs that
differ only in program inputs, share their compiled programs); the tables and
plots give the mean ± sample standard deviation over seeds.
Outputs in --out: results.csv, results.md, plots (PNG), and each run's
directory, ``<dataset>/<run>/seed<s>``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsee_jax import config as config_lib  # noqa: E402
from hsee_jax import sweep  # noqa: E402
from hsee_jax import costs, models, rundir  # noqa: E402
from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax.config import Config  # noqa: E402
from hsee_jax.data import DataError, load_dataset  # noqa: E402

HETERO_CUTS = (3, 5, 7)
# Three device tiers for the heterogeneous clients (weak, middle, strong), the
# server, and the link; used by the simulated wall clock.
TIERS = {"client_flops_per_s": (2e9, 1e10, 5e10), "server_flops_per_s": 1e13,
         "link_bytes_per_s": 1.25e6}
# Compute budgets of the same three tiers, for the "device budgets -> cuts"
# table: the share of the deepest client part's (cut 8) training FLOPs per step
# each device affords; they come out at cuts 3, 5, 7 for this network.
BUDGET_SHARES = (0.40, 0.70, 0.95)

SCALES = {
    # whole CIFAR-10 grid in well under an hour on 2 CPU cores
    "cpu": dict(width=0.125, train_subset=10000, test_subset=0, rounds=8, batch_size=32,
                lr=0.05, eval_every=1, checkpoint_every=0),
    # the paper's setting (for an accelerator)
    "paper": dict(width=1.0, train_subset=0, test_subset=0, rounds=200, batch_size=128,
                  lr=0.1, eval_every=5, checkpoint_every=10),
}
RUNS = {
    "hsee-averaging": dict(strategy="averaging", cuts=HETERO_CUTS),
    "hsee-sequential": dict(strategy="sequential", cuts=HETERO_CUTS),
    "homogeneous": dict(strategy="averaging", cuts=(5, 5, 5)),
    "alone": dict(strategy="averaging", cuts=HETERO_CUTS, aggregate_every=10**9),
    "classical-split": dict(strategy="averaging", cuts=HETERO_CUTS, server_grad_to_client=True,
                            exit_loss_weight=0.0),
    "central": dict(strategy="averaging", cuts=(1,), server_grad_to_client=True,
                    exit_loss_weight=0.0),
}


def grid(dataset: str, scale: str, overrides: list[str], data_dir: str = "") -> list[tuple[str, Config]]:
  out = []
  for name, fields in RUNS.items():
    tiers = dict(TIERS)
    n = len(fields["cuts"])
    tiers["client_flops_per_s"] = tuple(TIERS["client_flops_per_s"][i % 3] for i in range(n))
    cfg = Config(name=dataset, dataset=dataset, data_dir=data_dir,
                 **SCALES[scale], **tiers, **fields)
    out.append((name, config_lib.override(cfg, overrides)))
  return out


def shrink_note(scale: str) -> str:
  if scale == "paper":
    return "paper scale: width 1.0, the whole train and test sets, 200 rounds, batch 128"
  s = SCALES["cpu"]
  return (f"cpu scale shrinks the paper's setting: width {s['width']} (of 1.0), "
          f"{s['train_subset']} training images (of all), {s['rounds']} rounds (of 200), "
          f"batch {s['batch_size']} (of 128); the whole test set")


def _records(run_dir: Path) -> list[dict]:
  return rundir.read_records(run_dir / "metrics.jsonl")


def run_grid(datasets, scale, out: Path, overrides=(), data_dirs=None, log=print,
             report_only: bool = False, seeds=(0, 1, 2)) -> dict:
  """Train every run of the grid for every seed (or, ``report_only``, read the
  finished runs in ``out``) and write the tables and plots."""
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
      sweep.train_runs(planned, out / ds_name, dataset=dataset, log=lambda s: log("    " + s))
    ds_res = results["datasets"][ds_name] = {"runs": {}}
    for name, _ in runs:
      ds_res["runs"][name] = [_load_run(out / ds_name / name / f"seed{s}") for s in seeds]
    _account(ds_res, dataset, runs[0][1])
  write_outputs(results, out, log)
  return results


def _load_run(run_dir: Path) -> dict:
  if not (run_dir / "summary.json").exists():
    raise train_lib.RunError(f"{run_dir} holds no finished run (no summary.json)")
  summary = rundir.read_summary(run_dir)
  return {"config": summary["config"], "summary": summary,
          "wall_seconds": summary["wall_seconds"], "records": _records(run_dir)}


def _account(ds_res: dict, dataset, cfg: Config) -> None:
  """Cost table, budgets -> cuts and simulated time for one dataset's runs."""
  net = models.network(cfg.model, dataset.num_classes, cfg.width, cfg.exit_head)
  table = {r["cut"]: r for r in costs.cost_table(net, dataset.image_shape)}
  ds_res["costs"] = list(table.values())
  deepest = table[max(table)]["client_train_flops"] * cfg.batch_size
  budgets = [(share * deepest, 0) for share in BUDGET_SHARES]
  ds_res["budgets"] = [dict(c, budget_flops_per_step=b[0], share=share) for c, b, share in
                       zip(costs.choose_cuts(net, dataset.image_shape, budgets, cfg.batch_size),
                           budgets, BUDGET_SHARES)]
  ds_res["simulated"] = _simulate(ds_res["runs"], table)


def _simulate(runs: dict, table: dict) -> dict:
  sim = {}
  for name, per_seed in runs.items():
    r = per_seed[0]   # the simulated clock depends on the config, not on the seed
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["config"].items()})
    cuts = r["summary"]["cuts"]
    steps = r["summary"]["local_steps"]
    per_round = []
    for rec in r["records"]:
      if "round" not in rec or "train" not in rec:
        continue
      agg = (cfg.strategy == "averaging" and (rec["round"] + 1) % cfg.aggregate_every == 0) or \
            (cfg.strategy == "sequential" and cfg.client_aggregation != "none")
      cut_table = table
      if cfg.server_grad_to_client:
        cut_table = {c: {**row, "bytes_server_to_client": row["bytes_client_to_server"]}
                     for c, row in table.items()}
      per_round.append(costs.simulated_round_seconds(
          cfg.strategy, cuts, cut_table, steps, cfg.batch_size, cfg.client_flops_per_s,
          cfg.server_flops_per_s, cfg.link_bytes_per_s, aggregate=agg))
    sim[name] = per_round
  return sim


# -- outputs ---------------------------------------------------------------------------------
def _pm(ms, digits: int = 3) -> str:
  mean, std = ms
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def _cut_rows(per_seed: list[dict]) -> list[dict]:
  """One row per cut: the accuracies of the cut's clients (all of them share
  one model after an Averaging aggregation), mean and std over seeds, and the
  early-exit table averaged over seeds."""
  tests = [r["summary"]["test"] for r in per_seed]
  rows = []
  for j, c in enumerate(tests[0]["cuts"]):
    cs = [t["cuts"][j] for t in tests]
    rows.append({
        "client": f"{c['clients']} client{'s' if c['clients'] > 1 else ''}", "cut": c["cut"],
        "exit_acc": sweep.mean_std([x["exit_acc"]["mean"] for x in cs]),
        "full_acc": sweep.mean_std([x["full_acc"]["mean"] for x in cs]),
        "early_exit": [{"threshold": e["threshold"],
                        "accuracy": float(np.mean([x["early_exit"][k]["accuracy"] for x in cs])),
                        "client_fraction": float(np.mean([x["early_exit"][k]["client_fraction"]
                                                          for x in cs]))}
                       for k, e in enumerate(c["early_exit"])]})
  return rows


def _run_means(per_seed: list[dict]) -> dict:
  """Mean exit and full-path accuracy over the fleet: mean and std over seeds."""
  tests = [r["summary"]["test"] for r in per_seed]
  return {"exit": sweep.mean_std([t["mean_exit_acc"] for t in tests]),
          "full": sweep.mean_std([t["mean_full_acc"] for t in tests])}


def write_outputs(results: dict, out: Path, log=print) -> None:
  rows = []
  for ds_name, ds in results["datasets"].items():
    for name, per_seed in ds["runs"].items():
      first = per_seed[0]
      for c in _cut_rows(per_seed):
        rows.append({"dataset": ds_name, "run": name, "strategy": first["config"]["strategy"],
                     "client": c["client"], "cut": c["cut"], "seeds": len(per_seed),
                     "exit_accuracy": round(c["exit_acc"][0], 4),
                     "exit_accuracy_std": round(c["exit_acc"][1], 4),
                     "full_path_accuracy": round(c["full_acc"][0], 4),
                     "full_path_accuracy_std": round(c["full_acc"][1], 4),
                     "rounds": first["summary"]["rounds"],
                     "wall_seconds": round(float(np.mean([r["wall_seconds"] for r in per_seed])), 1),
                     "simulated_seconds": round(sum(ds["simulated"][name]), 1)})
  if rows:
    with open(out / "results.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  (out / "results.md").write_text(_markdown(results, rows))
  (out / "results.json").write_text(json.dumps(
      {k: v for k, v in results.items() if k != "datasets"} | {"rows": rows}, indent=2))
  _plots(results, out, log)
  log(f"[reproduce] wrote {out}/results.csv, results.md and plots")


def _markdown(results: dict, rows: list[dict]) -> str:
  md = [f"# Hetero-SplitEE results ({results['scale']} scale)", "", results["note"] + ".", "",
        f"Every run trained with seeds {', '.join(map(str, results['seeds']))}: accuracies are "
        f"the mean ± sample standard deviation over the {len(results['seeds'])} seeds "
        f"(no ± with one seed).", ""]
  if results["overrides"]:
    md += [f"Overrides for every run: `{' '.join(results['overrides'])}`.", ""]
  for ds_name, why in results["skipped"].items():
    md += [f"- {ds_name} skipped: {why}"]
  for ds_name, ds in results["datasets"].items():
    md += [f"## {ds_name}", "", "### Test accuracy per cut", "",
           "Exit = the client's early-exit head alone; full = client part then server part.", "",
           "| run | strategy | cuts | `exit_acc` per cut | `full_acc` per cut | mean `exit_acc` | mean `full_acc` | wall s (mean) | simulated s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, per_seed in ds["runs"].items():
      rs = [r for r in rows if r["dataset"] == ds_name and r["run"] == name]
      cuts = _cut_rows(per_seed)
      means = _run_means(per_seed)
      md.append(f"| {name} | {rs[0]['strategy']} | {', '.join(str(r['cut']) for r in rs)} | "
                f"{' / '.join(_pm(c['exit_acc']) for c in cuts)} | "
                f"{' / '.join(_pm(c['full_acc']) for c in cuts)} | "
                f"{_pm(means['exit'])} | {_pm(means['full'])} | {rs[0]['wall_seconds']} | "
                f"{rs[0]['simulated_seconds']} |")
    md += ["", "`central` has one client holding the whole network (its 'full' is the uncut "
           "ResNet-18); `classical-split` and `central` train no exit head (exit_loss_weight 0), "
           "so their exit accuracies are not meaningful.", ""]
    hsee = [n for n in ("hsee-averaging", "hsee-sequential") if n in ds["runs"]]
    if hsee:
      taus = [r["threshold"] for r in _cut_rows(ds["runs"][hsee[0]])[0]["early_exit"]]
      md += ["### Entropy early exit (Hetero-SplitEE runs)", "",
             "Accuracy / share of samples answered at the client, per threshold tau "
             "(means over seeds).", "",
             "| run | clients (cut) | " + " | ".join(f"tau {t:g}" for t in taus) + " |",
             "| --- | --- | " + " | ".join("---" for _ in taus) + " |"]
      for name in hsee:
        for c in _cut_rows(ds["runs"][name]):
          md.append(f"| {name} | {c['client']} ({c['cut']}) | " + " | ".join(
              f"{r['accuracy']:.3f} / {r['client_fraction']:.2f}" for r in c["early_exit"]) + " |")
    md += ["", "### Cost per cut layer (per training image, computed from the model)", "",
           "| cut | client params | server params | client train GFLOPs | server train GFLOPs | "
           "bytes client→server | bytes server→client (classical) | client peak activations (KiB) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in ds["costs"]:
      md.append(f"| {r['cut']} | {r['client_params']:,} | {r['server_params']:,} | "
                f"{r['client_train_flops'] / 1e9:.4f} | {r['server_train_flops'] / 1e9:.4f} | "
                f"{r['bytes_client_to_server']:,} | {r['bytes_client_to_server']:,} | "
                f"{r['client_peak_activation_bytes'] / 1024:.1f} |")
    md += ["", "The Hetero-SplitEE update sends no gradient back (server→client bytes 0); "
           "the classical-split baseline sends the activation gradient, the same size as "
           "the activations.", "",
           "### Simulated wall clock", "",
           f"Device tiers: clients {', '.join(f'{f:.0e}' for f in TIERS['client_flops_per_s'])} "
           f"FLOP/s (cut 3, 5, 7), server {TIERS['server_flops_per_s']:.0e} FLOP/s, link "
           f"{TIERS['link_bytes_per_s'] * 8 / 1e6:g} Mbit/s (model: `costs.simulated_round_seconds`).", "",
           "| run | simulated s per round (mean) | simulated s in all |", "| --- | --- | --- |"]
    for name, per in ds["simulated"].items():
      md.append(f"| {name} | {sum(per) / max(1, len(per)):.1f} | {sum(per):.1f} |")
    md += ["", "### Device budgets → cuts", "",
           "Deepest cut whose client cost fits each budget (`costs.choose_cuts`, batch "
           f"{next(iter(ds['runs'].values()))[0]['config']['batch_size']}):", "",
           "Budgets: the share of the deepest client part's (cut 8) training FLOPs per step "
           "that each device tier affords.", "",
           "| client | budget (FLOPs/step) | share of cut 8 | cut | why |",
           "| --- | --- | --- | --- | --- |"]
    for c in ds["budgets"]:
      md.append(f"| {c['client']} | {c['budget_flops_per_step']:.3g} | {c['share']:.2f} | "
                f"{c['cut']} | {c['reason']} |")
    md.append("")
  return "\n".join(md)


def _plots(results: dict, out: Path, log=print) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log("[reproduce] matplotlib not installed (pip install -e '.[plot]'): no plots")
    return
  for ds_name, ds in results["datasets"].items():
    runs = ds["runs"]
    # accuracy per client exit for each run
    fig, ax = plt.subplots(figsize=(9, 4))
    x = 0
    ticks, labels = [], []
    err = lambda ms: ms[1] if np.isfinite(ms[1]) else 0.0
    for name, per_seed in runs.items():
      for c in _cut_rows(per_seed):
        ax.bar(x - 0.2, c["exit_acc"][0], 0.4, yerr=err(c["exit_acc"]), capsize=2, color="tab:blue")
        ax.bar(x + 0.2, c["full_acc"][0], 0.4, yerr=err(c["full_acc"]), capsize=2,
               color="tab:orange")
        ticks.append(x)
        labels.append(f"{name}\nl={c['cut']}")
        x += 1
      x += 0.5
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.legend(["exit head", "full path"], fontsize=8)
    ax.set_title(f"{ds_name}: accuracy per client exit (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / f"{ds_name}_exit_accuracy.png", dpi=110)
    plt.close(fig)
    # test accuracy against round, and against simulated time
    for kind in ("round", "simulated"):
      fig, ax = plt.subplots(figsize=(6, 4))
      for name, per_seed in runs.items():
        if kind == "simulated" and name not in ("hsee-averaging", "hsee-sequential"):
          continue
        by_seed = [[rec for rec in r["records"] if "test" in rec] for r in per_seed]
        recs = by_seed[0]
        if kind == "round":
          xs = [rec["round"] + 1 for rec in recs]
        else:
          cum = [sum(ds["simulated"][name][:i + 1]) for i in range(len(ds["simulated"][name]))]
          xs = [cum[rec["round"]] for rec in recs]
        for metric, style in (("mean_full_acc", dict(marker="o")), ("mean_exit_acc", dict(ls="--"))):
          ys = np.mean([[rec["test"][metric] for rec in rs] for rs in by_seed], axis=0)
          ax.plot(xs, ys, label=f"{name} {'full' if 'full' in metric else 'exit'}", **style)
      ax.set_xlabel("round" if kind == "round" else "simulated seconds")
      ax.set_ylabel("mean test accuracy over clients and seeds")
      ax.legend(fontsize=6)
      ax.set_title(f"{ds_name}: test accuracy against {'round' if kind == 'round' else 'simulated time'}")
      fig.tight_layout()
      fig.savefig(out / f"{ds_name}_accuracy_vs_{kind}.png", dpi=110)
      plt.close(fig)
    # entropy early-exit curves
    names = [n for n in ("hsee-averaging", "hsee-sequential") if n in runs]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
      for c in _cut_rows(runs[name]):
        ee = c["early_exit"]
        ax.plot([r["client_fraction"] for r in ee], [r["accuracy"] for r in ee], marker=".",
                label=f"cut {c['cut']} ({c['client']})")
      ax.set_xlabel("share of samples answered at the client")
      ax.set_ylabel("accuracy")
      ax.set_title(f"{ds_name} {name}: entropy early exit")
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{ds_name}_early_exit.png", dpi=110)
    plt.close(fig)


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
  p.add_argument("--report-only", action="store_true",
                 help="no training: rebuild the tables and plots from the finished runs in --out")
  args = p.parse_args(argv)
  data_dirs = dict(d.split("=", 1) for d in args.data_dir)
  try:
    run_grid(args.datasets.split(","), args.scale, Path(args.out), args.overrides, data_dirs,
             report_only=args.report_only, seeds=sweep.parse_seeds(args.seeds))
  except (config_lib.ConfigError, DataError, train_lib.RunError) as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
