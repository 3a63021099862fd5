"""Reproduce the paper's experiments: the grid, the baselines, tables, verdicts and plots.

    python experiments/reproduce.py --scale evidence --out runs/evidence     # the claims, this CPU
    python experiments/reproduce.py --scale cpu --out runs/reproduce         # the short grid
    python experiments/reproduce.py --scale gpu --out runs/gpu               # paper scale, 8 min of a GPU
    python experiments/reproduce.py --scale paper --out runs/paper           # 200 rounds, an accelerator
    python experiments/reproduce.py --datasets cifar10,cifar100,stl10 --seeds 0,1,2 ...
    python experiments/reproduce.py --datasets imagefolder --data-dir imagefolder=/my/data ...

Each scale has its grid of runs (``SCALES[scale]["grid"]``, a key of ``GRIDS``):

* ``baseline`` (scales cpu, paper):
  hsee-averaging    Hetero-SplitEE, Averaging, heterogeneous cuts l = 3, 5, 7
  hsee-sequential   Hetero-SplitEE, Sequential, the same cuts
  homogeneous       split learning with every client at the same cut (l = 5), Averaging
  alone             each client on its own data with its exit head, no aggregation
  classical-split   the server gradient goes back to the client (no exit loss), cuts 3, 5, 7
  central           the uncut ResNet-18 trained on all the data
* ``evidence`` (scale evidence): the runs that test each claim of PAPER.md
  ("The paper's claims"): the baseline runs with ``homogeneous-weak`` (every
  client at l = 3) and ``homogeneous-mid`` (l = 5) in place of
  ``homogeneous``, ``strong-only`` (the weak tier left out: clients at 5 and 7
  on their two thirds of the data), and ``-noniid`` twins of hsee-averaging,
  alone and homogeneous-weak on a Dirichlet(0.3) split (Sequential's exits are
  alone's by construction: its client parts never aggregate);
  ``results.md`` gets a verdict per claim (:func:`verdicts`) and a plot per claim.
* ``variants`` and ``variants-more`` (scales of the same names): the
  exit-aware variants (:data:`VARIANTS`; the second grid the proximal term
  and the two sides averaged apart) against plain Averaging, alone and
  homogeneous-weak at the evidence recipe; ``results.md`` gets the goal per
  variant (:func:`goal`). ``variants-user``: two methods written as user
  files (``examples/fedbn.py``, ``examples/depthfl_sum.py``) beside plain
  Averaging and every-exit. All three can share an ``--out`` with ``--resume``.
* ``iot`` and ``iot-more`` (scales of the same names): participation rules
  and link settings on a 20-client fleet with device speeds; the second
  grid the deadline shared among the tiers, beside everyone and the plain
  deadline.
* ``gpu`` (scale gpu): the paper's scale (width 1.0, the whole CIFAR-10) for one
  seed: hsee-averaging, hsee-sequential, homogeneous-weak, alone, central.

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
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsee_jax import config as config_lib  # noqa: E402
from hsee_jax import sweep  # noqa: E402
from hsee_jax import costs, models, rundir  # noqa: E402
from hsee_jax import train as train_lib  # noqa: E402
from hsee_jax import fleet as fleet_lib  # noqa: E402
from hsee_jax.config import Config  # noqa: E402
from hsee_jax.data import DataError, load_dataset  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

HETERO_CUTS = (3, 5, 7)
# Three device tiers for the heterogeneous clients (weak, middle, strong), the
# server, and the link; used by the simulated wall clock.
TIERS = {"client_flops_per_s": (2e9, 1e10, 5e10), "server_flops_per_s": 1e13,
         "link_bytes_per_s": 1.25e6}
# Compute budgets of the same three tiers, for the "device budgets -> cuts"
# table: the share of the deepest client part's (cut 8) training FLOPs per step
# each device affords; they come out at cuts 3, 5, 7 for this network.
BUDGET_SHARES = (0.40, 0.70, 0.95)

EVIDENCE_RECIPE = dict(width=0.125, train_subset=2000, test_subset=0, rounds=40, schedule="step",
                       batch_size=32, lr=0.05, eval_every=8, checkpoint_every=0)
SCALES = {
    # the short grid: whole CIFAR-10 baseline grid in under an hour on 2 CPU cores
    "cpu": dict(grid="baseline", width=0.125, train_subset=10000, test_subset=0, rounds=8,
                batch_size=32, lr=0.05, eval_every=1, checkpoint_every=0),
    # the claims at convergence on 2 CPU cores (docs/results.md): with the
    # learning rate cut tenfold at half and three quarters of the rounds,
    # central's test accuracy levels off (the last fifth adds under a point).
    # The exit-aware variants (against plain Averaging, alone and
    # homogeneous-weak; the evidence grid's runs of the same configs are
    # identical) and the IoT fleet (its evaluations every 8 rounds give
    # accuracy against time) use the same recipe.
    **{grid: dict(EVIDENCE_RECIPE, grid=grid)
       for grid in ("evidence", "variants", "variants-more", "variants-user", "iot", "iot-more")},
    # the paper's network and data for as many rounds as fit in 8 minutes of an
    # H200 with compilation (docs/results.md, "The paper's scale on a GPU")
    "gpu": dict(grid="gpu", width=1.0, train_subset=0, test_subset=0, rounds=15, batch_size=128,
                lr=0.1, eval_every=5, checkpoint_every=0),
    # the paper's setting (for an accelerator)
    "paper": dict(grid="baseline", width=1.0, train_subset=0, test_subset=0, rounds=200,
                  batch_size=128, lr=0.1, eval_every=5, checkpoint_every=10),
}
NON_IID = dict(partition="dirichlet", dirichlet_alpha=0.3)
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
# ``data_share``: the run trains on this share of the scale's training images
# (the weak tier's third left out), with the same images per client; the
# devices keep their tiers' speeds (clients without their own are the
# weak, middle and strong tier in turn).
EVIDENCE_RUNS = {
    "hsee-averaging": RUNS["hsee-averaging"],
    "hsee-sequential": RUNS["hsee-sequential"],
    "alone": RUNS["alone"],
    "homogeneous-weak": dict(strategy="averaging", cuts=(3, 3, 3)),
    "homogeneous-mid": dict(strategy="averaging", cuts=(5, 5, 5)),
    "strong-only": dict(strategy="averaging", cuts=(5, 7), data_share=2 / 3,
                        client_flops_per_s=TIERS["client_flops_per_s"][1:]),
    "classical-split": RUNS["classical-split"],
    "central": RUNS["central"],
    "hsee-averaging-noniid": dict(RUNS["hsee-averaging"], **NON_IID),
    "alone-noniid": dict(RUNS["alone"], **NON_IID),
    "homogeneous-weak-noniid": dict(cuts=(3, 3, 3), **NON_IID),
}
GPU_RUNS = {name: EVIDENCE_RUNS[name] for name in
            ("hsee-averaging", "hsee-sequential", "homogeneous-weak", "alone", "central")}
# The exit-aware variants ([choice]; docs/usage.md, "Exit-aware training and
# aggregation"), each on plain Averaging's fleet. ``combined`` was fixed before
# the grid ran: DepthFL (every exit, self-distillation) with HeteroFL's static BN.
# The next three were added after the first five were measured, as the next
# steps their figures pointed to: exits weighted by depth, ScaleFL's own
# distillation settings (weight 0.05, T = 3, from a quarter of the rounds on),
# and every exit with static BN; the last two after those, for the deepest
# exit's non-IID shortfall: FedProx's proximal term at two weights of its
# paper's grid (0.001-1), 1 and 0.01; the last two after those, to test the
# averaging study's cause directly: client-side and server-side copies of a
# unit averaged apart (SplitFed), alone and with every exit. The last four
# form a grid of their own (``variants-more``), so that each grid fits in 90
# minutes of these 2 CPU cores; both share the baselines.
VARIANTS = {
    "every-exit": dict(client_exits="every"),
    "distill": dict(client_exits="every", distill="deepest"),
    "tier-local-top": dict(tier_local_top=True),
    "static-bn": dict(static_bn=True),
    "combined": dict(client_exits="every", distill="deepest", static_bn=True),
    "rising": dict(client_exits="every", exit_weights="rising"),
    "distill-scalefl": dict(client_exits="every", distill="deepest", distill_weight=0.05,
                            distill_temperature=3.0, distill_start=11),
    "every-exit-static-bn": dict(client_exits="every", static_bn=True),
    "prox": dict(prox_mu=1.0),
    "prox-0.01": dict(prox_mu=0.01),
    "sides-apart": dict(aggregate_sides="apart"),
    "every-exit-sides-apart": dict(client_exits="every", aggregate_sides="apart"),
    # methods written as user files (hsee_jax.variants), run as `--variant FILE.py` runs them
    "fedbn": dict(variants=(f"{EXAMPLES / 'fedbn.py'}:variant",)),
    "depthfl-sum": dict(client_exits="every", variants=(f"{EXAMPLES / 'depthfl_sum.py'}:variant",)),
}
MORE_VARIANTS = ("prox", "prox-0.01", "sides-apart", "every-exit-sides-apart")
USER_VARIANTS = ("fedbn", "depthfl-sum")   # their own grid, paired with Averaging and every-exit


def _variant_runs(names) -> dict:
  """Plain Averaging, alone and homogeneous-weak (the evidence grid's) and
  the variants ``names``, IID and Dirichlet(0.3)."""
  return {
      **{name: EVIDENCE_RUNS[name] for sfx in ("", "-noniid")
         for name in (f"hsee-averaging{sfx}", f"alone{sfx}", f"homogeneous-weak{sfx}")},
      **{f"{v}{sfx}": dict(RUNS["hsee-averaging"], **VARIANTS[v], **extra)
         for v in names for sfx, extra in (("", {}), ("-noniid", NON_IID))},
  }


VARIANT_RUNS = _variant_runs([v for v in VARIANTS if v not in MORE_VARIANTS + USER_VARIANTS])
VARIANT_MORE_RUNS = _variant_runs(MORE_VARIANTS)
VARIANT_USER_RUNS = {name: run for name, run in _variant_runs(("every-exit",) + USER_VARIANTS).items()
                     if not name.startswith(("alone", "homogeneous-weak"))}
# The IoT fleet (docs/usage.md, "Device speeds, deadlines and the link"): 20
# clients in the three tiers (7 / 7 / 6 at cuts 3 / 5 / 7), each client's FLOP/s
# and bandwidth drawn lognormal (sigma 0.5) around its tier's (TIERS); the
# participation rules and the link settings on Averaging. ``deadline`` samples
# everyone and keeps the first 14 to finish (over-commitment 20 / 14: the
# slowest 30% dropped every round); ``partial`` gives every client the time in
# which 70% of seed 0's fleet finish a round (``deadline_share``, turned into
# ``deadline_s`` by :func:`grid`) and the slower ones do the steps that fit.
# ``deadline-by-tier`` keeps the first 14 too, but each tier its share of them
# (5 / 5 / 4: ``deadline_by_tier``), so the slowest tier is not the one
# dropped; it forms a grid of its own with its two references
# (``iot-more``), so that each grid fits in 60 minutes of these 2 CPU cores.
IOT_FLEET = dict(strategy="averaging", num_clients=20, cut_tiers=((3, 0.35), (5, 0.35), (7, 0.3)),
                 speed_spread=0.5, client_link_bytes_per_s=(1.25e6, 1.25e6, 1.25e6))
IOT = {
    "everyone": {},
    "deadline": dict(participation="deadline", clients_per_round=14, overcommit=20 / 14,
                     deadline_s=1e9),
    "partial": dict(participation="partial", deadline_share=0.7),
    "int8": dict(link="int8"),
    "topk": dict(link="topk", link_topk=0.1),
    "deadline-by-tier": dict(participation="deadline", clients_per_round=14, overcommit=20 / 14,
                             deadline_s=1e9, deadline_by_tier=True),
}
IOT_MORE = ("everyone", "deadline", "deadline-by-tier")
IOT_RULES = ("deadline", "partial", "deadline-by-tier")   # the participation rules


def _iot_runs(names) -> dict:
  """The IoT settings ``names`` on the IoT fleet, IID and Dirichlet(0.3)."""
  return {f"{name}{sfx}": dict(IOT_FLEET, **IOT[name], **extra)
          for name in names for sfx, extra in (("", {}), ("-noniid", NON_IID))}


IOT_RUNS = _iot_runs([n for n in IOT if n != "deadline-by-tier"])
IOT_MORE_RUNS = _iot_runs(IOT_MORE)
GRIDS = {"baseline": RUNS, "evidence": EVIDENCE_RUNS, "gpu": GPU_RUNS, "variants": VARIANT_RUNS,
         "variants-more": VARIANT_MORE_RUNS, "variants-user": VARIANT_USER_RUNS,
         "iot": IOT_RUNS, "iot-more": IOT_MORE_RUNS}


def grid(dataset: str, scale: str, overrides: list[str], data_dir: str = "") -> list[tuple[str, Config]]:
  """The runs of ``scale``'s grid on ``dataset``: (run name, config), the
  overrides applied to every run."""
  fields_of_scale = {k: v for k, v in SCALES[scale].items() if k != "grid"}
  out = []
  for name, fields in GRIDS[SCALES[scale]["grid"]].items():
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
  write_outputs(results, out, log)
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
    cut_table = costs.run_cost_table(cfg, net, image_shape, cuts)
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


# -- the paper's claims ----------------------------------------------------------------------
# A comparison: (run a, metric, cut, run b, metric, cut, kind). ``cut`` None is
# the mean over the fleet; ``kind`` "better": a above b; "not_worse": a not
# below b. Comparisons whose runs are not in the grid are left out.
def _tiers(a: str, b: str, kind: str = "better") -> list:
  return [(a, "exit_acc", c, b, "exit_acc", c, kind) for c in HETERO_CUTS]


CLAIMS = [
    (1, "One shared network from heterogeneous clients, at competitive accuracy "
        "(full path against the split and central baselines)",
     [("hsee-averaging", "full_acc", None, b, "full_acc", None, "not_worse")
      for b in ("homogeneous-weak", "homogeneous-mid", "homogeneous", "classical-split", "central")]
     + [("hsee-sequential", "full_acc", None, "homogeneous-weak", "full_acc", None, "not_worse")]),
    (2, "Collaboration helps every device (each tier's exit against the same client alone)",
     [c for sfx in ("", "-noniid") for c in
      _tiers(f"hsee-averaging{sfx}", f"alone{sfx}") + _tiers(f"hsee-sequential{sfx}", f"alone{sfx}")
      + [(f"hsee-averaging{sfx}", "full_acc", None, f"alone{sfx}", "full_acc", None, "better")]]),
    (3, "Heterogeneity pays (deeper exits are better; the weak tier gains from the strong "
        "tiers; leaving the weak tier out is worse)",
     [("hsee-averaging", "exit_acc", 5, "hsee-averaging", "exit_acc", 3, "better"),
      ("hsee-averaging", "exit_acc", 7, "hsee-averaging", "exit_acc", 5, "better"),
      ("hsee-averaging", "exit_acc", 3, "homogeneous-weak", "exit_acc", 3, "better"),
      ("hsee-averaging-noniid", "exit_acc", 3, "homogeneous-weak-noniid", "exit_acc", 3, "better"),
      ("hsee-averaging", "full_acc", None, "strong-only", "full_acc", None, "better"),
      ("hsee-averaging", "exit_acc", 5, "strong-only", "exit_acc", 5, "better"),
      ("hsee-averaging", "exit_acc", 7, "strong-only", "exit_acc", 7, "better")]),
    (4, "Sequential against Averaging: accuracy (its costs in the table below)",
     [("hsee-sequential", "exit_acc", None, "hsee-averaging", "exit_acc", None, "not_worse"),
      ("hsee-sequential", "full_acc", None, "hsee-averaging", "full_acc", None, "not_worse")]),
]
# The variants' goal (issue 33), one claim per line of it, for each variant
# and plain Averaging (the reference rows), IID and Dirichlet(0.3).
def _variant_claims() -> list:
  names = ["hsee-averaging"] + list(VARIANTS)
  splits = ("", "-noniid")
  return [
      (5, "Every tier's exit not worse than the same client alone",
       [c for n in names for sfx in splits for c in _tiers(n + sfx, f"alone{sfx}", "not_worse")]),
      (6, "The weak tier's exit not worse than an all-weak fleet (homogeneous-weak)",
       [(n + sfx, "exit_acc", HETERO_CUTS[0], f"homogeneous-weak{sfx}", "exit_acc",
         HETERO_CUTS[0], "not_worse") for n in names for sfx in splits]),
      (7, "Nothing worse than plain Averaging (each tier's exit and the full path)",
       [c for n in VARIANTS for sfx in splits for c in
        _tiers(n + sfx, f"hsee-averaging{sfx}", "not_worse")
        + [(n + sfx, "full_acc", None, f"hsee-averaging{sfx}", "full_acc", None, "not_worse")]]),
  ]


VARIANT_CLAIMS = _variant_claims()


def _iot_claims() -> list:
  rules, links = IOT_RULES, ("int8", "topk")
  splits = ("", "-noniid")
  return [
      (8, "A compressed link costs no accuracy (full path not worse than the link as computed)",
       [(n + sfx, "full_acc", None, f"everyone{sfx}", "full_acc", None, "not_worse")
        for n in links for sfx in splits]),
      (9, "A deadline hurts no tier (each tier's exit and the full path not worse than everyone)",
       [c for n in rules for sfx in splits for c in
        _tiers(n + sfx, f"everyone{sfx}", "not_worse")
        + [(n + sfx, "full_acc", None, f"everyone{sfx}", "full_acc", None, "not_worse")]]),
  ]


IOT_CLAIMS = _iot_claims()
CLAIM_SETS = {"variants": VARIANT_CLAIMS, "variants-more": VARIANT_CLAIMS,
              "variants-user": VARIANT_CLAIMS, "iot": IOT_CLAIMS,
              "iot-more": IOT_CLAIMS}


def claims_of(scale: str) -> list:
  """The claims a scale's grid is judged on."""
  return CLAIM_SETS.get(SCALES[scale]["grid"], CLAIMS)


VERDICT_RULE = ("paired by seed (the runs of a seed share data, partition and initial "
                "weights): d = a - b per seed, its mean and standard error se = sd / sqrt(n); "
                "*better* holds when mean d > 2 se and does not hold when mean d < -2 se; "
                "*not worse* holds when mean d > -2 se (better, or within the spread) and "
                "does not hold when mean d < -2 se; otherwise the two cannot be told apart "
                "from the spread. One seed gives no spread, hence no verdict; *equal in every "
                "seed* marks two runs that compute the same thing.")


def _value(run: dict, metric: str, cut: int | None) -> float:
  """One finished run's final test accuracy: the fleet mean, or the mean over
  the clients of one cut."""
  test = run["summary"]["test"]
  if cut is None:
    return test[f"mean_{metric}"]
  return next(c[metric]["mean"] for c in test["cuts"] if c["cut"] == cut)


def _label(run: str, metric: str, cut: int | None) -> str:
  return f"{run} {metric}" + (f" at cut {cut}" if cut is not None else " (fleet mean)")


def verdicts(runs: dict, claims: list = CLAIMS) -> list[dict]:
  """Each claim's comparisons on one dataset's finished runs (``runs``: run
  name -> one finished run per seed): both sides' mean ± std over seeds, the
  paired difference and the verdict (:data:`VERDICT_RULE`)."""
  rows = []
  for claim, text, comparisons in claims:
    for a, ma, ca, b, mb, cb, kind in comparisons:
      if a not in runs or b not in runs:
        continue
      try:
        va = [_value(r, ma, ca) for r in runs[a]]
        vb = [_value(r, mb, cb) for r in runs[b]]
      except StopIteration:  # a cut the run does not have (a grid changed by --set)
        continue
      d = np.asarray(va) - np.asarray(vb)
      se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
      mean = float(d.mean())
      if not d.any():
        verdict = "equal in every seed"   # the same computation (Sequential's exits and alone's)
      elif not np.isfinite(se):
        verdict = "one seed: no verdict"
      elif kind == "better":
        verdict = ("holds" if mean > 2 * se else "does not hold" if mean < -2 * se
                   else "cannot be told apart from the spread")
      else:
        verdict = ("does not hold" if mean < -2 * se else
                   "holds (better)" if mean > 2 * se else "holds (within the spread)")
      rows.append({"claim": claim, "claim_text": text, "kind": kind,
                   "a": _label(a, ma, ca), "b": _label(b, mb, cb), "a_run": a, "b_run": b,
                   "metric": ma, "cut": ca,
                   "a_value": sweep.mean_std(va), "b_value": sweep.mean_std(vb),
                   "difference": (mean, se), "verdict": verdict})
  return rows


def convergence(runs: dict, run: str = "central") -> dict | None:
  """Has ``run``'s test accuracy levelled off? The gain of its mean
  ``full_acc`` (over seeds) over the last fifth of the rounds: from the last
  evaluation at or before round 0.8 R to the last one."""
  if run not in runs:
    return None
  curves = [[(rec["round"] + 1, rec["test"]["mean_full_acc"]) for rec in r["records"]
             if "test" in rec] for r in runs[run]]
  rounds = runs[run][0]["summary"]["rounds"]
  before = [x for x in curves[0] if x[0] <= 0.8 * rounds]
  if not before:
    return None
  at, end = before[-1][0], curves[0][-1][0]
  pick = lambda curve, rnd: next(acc for r, acc in curve if r == rnd)
  gain = float(np.mean([pick(c, end) - pick(c, at) for c in curves]))
  return {"run": run, "from_round": at, "to_round": end, "gain": gain, "levelled": gain < 0.01}


def server_costs(ds: dict) -> list[dict]:
  """Per Hetero-SplitEE run (first seed; costs depend on the config only): the
  server's persistent state (float32 parameters and SGD momentum: one server
  part per client under Averaging, one shared from the shallowest cut under
  Sequential), the server's training FLOPs per round and the simulated
  seconds per round, beside the fleet's mean accuracies."""
  table = {r["cut"]: r for r in ds["costs"]}
  out = []
  for name, per_seed in ds["runs"].items():
    cfg, summ = per_seed[0]["config"], per_seed[0]["summary"]
    if not name.startswith("hsee-"):
      continue
    cuts, steps = summ["cuts"], summ["local_steps"]
    held = [min(cuts)] if cfg["strategy"] == "sequential" else cuts
    means = _run_means(per_seed)
    sim = ds["simulated"][name]
    out.append({"run": name, "strategy": cfg["strategy"],
                "server_parts": len(held),
                "server_state_bytes": int(sum(2 * 4 * table[c]["server_params"] for c in held)),
                "server_train_flops_per_round": float(sum(
                    steps * cfg["batch_size"] * table[c]["server_train_flops"] for c in cuts)),
                "simulated_seconds_per_round": sum(sim) / max(1, len(sim)),
                "mean_exit_acc": means["exit"], "mean_full_acc": means["full"]})
  return out


def goal(rows: list[dict]) -> list[dict]:
  """Issue 33's goal per variant (and plain Averaging) and split, from the
  verdicts of claims 5-7: met when none of its comparisons "does not hold"
  (non-IID: every tier's exit against alone, the weak exit against
  homogeneous-weak, exits and full path against plain Averaging; IID: the
  last only). ``worst``: the lowest paired difference among them."""
  out = []
  for name in ["hsee-averaging"] + list(VARIANTS):
    for sfx in ("", "-noniid"):
      mine = [r for r in rows if r["a_run"] == name + sfx and (sfx or r["claim"] == 7)]
      if not mine:
        continue
      worst = min(mine, key=lambda r: r["difference"][0])
      out.append({"run": name + sfx, "split": "non-IID" if sfx else "IID",
                  "met": not any(r["verdict"] == "does not hold" for r in mine),
                  "failing": [f"{r['a']} vs {r['b']}" for r in mine if r["verdict"] == "does not hold"],
                  "worst": {"a": f"{worst['a']} vs {worst['b']}",
                            "difference": worst["difference"]}})
  return out


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
  claims = claims_of(results["scale"])
  for ds in results["datasets"].values():
    ds["verdicts"] = verdicts(ds["runs"], claims)
    ds["convergence"] = convergence(ds["runs"])
    ds["server_costs"] = server_costs(ds)
    ds["goal"] = goal(ds["verdicts"]) if claims is VARIANT_CLAIMS else []
  if rows:
    with open(out / "results.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  (out / "results.md").write_text(_markdown(results, rows))
  (out / "results.json").write_text(json.dumps(
      {k: v for k, v in results.items() if k != "datasets"} | {"rows": rows} | {
          "claims": {name: {k: ds[k] for k in ("verdicts", "convergence", "server_costs", "goal")}
                     for name, ds in results["datasets"].items()}}, indent=2))
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
    md += _claims_markdown(ds_name, ds, claims_of(results["scale"]))
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
                f"{r['bytes_client_to_server']:,} | "
                f"{r.get('classical_bytes_server_to_client', r['bytes_server_to_client']):,} | "
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


def _claims_markdown(ds_name: str, ds: dict, claims: list = CLAIMS) -> list[str]:
  md = []
  conv = ds["convergence"]
  if conv:
    md += ["### Convergence", "",
           f"`{conv['run']}` mean `full_acc` gained {conv['gain'] * 100:+.2f} points from round "
           f"{conv['from_round']} to round {conv['to_round']} (the last fifth of the rounds; mean "
           f"over seeds): {'levelled off (under one point)' if conv['levelled'] else 'still rising (one point or more)'}"
           f" (`{ds_name}_convergence.png`).", ""]
  if ds["verdicts"]:
    md += ["### The paper's claims", "", f"Verdict rule: {VERDICT_RULE}", "",
           "| claim | a | b | a (mean ± std) | b (mean ± std) | a - b (mean ± se) | verdict |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in ds["verdicts"]:
      want = ">" if v["kind"] == "better" else "≥"
      md.append(f"| {v['claim']} | {v['a']} | {want} {v['b']} | {_pm(v['a_value'])} | "
                f"{_pm(v['b_value'])} | {_pm(v['difference'])} | {v['verdict']} |")
    md += ["", "Claims: " + "; ".join(f"{k}. {text}" for k, text, _ in claims
                                       if any(v["claim"] == k for v in ds["verdicts"])) + ".", ""]
  if claims is IOT_CLAIMS and ds["verdicts"]:
    md += _iot_tables(ds)
  if ds.get("goal"):
    md += _variants_table(ds)
    md += ["### The goal: every tier served", "",
           "Met when none of the run's comparisons does not hold: on non-IID data every "
           "tier's exit ≥ alone, the weak exit ≥ homogeneous-weak, exits and full path ≥ "
           "plain Averaging (claims 5-7); on IID data the last. Worst: the lowest paired "
           "difference among them.", "",
           "| run | split | exit per cut (3 / 5 / 7) | `full_acc` | goal | worst comparison (a - b) |",
           "| --- | --- | --- | --- | --- | --- |"]
    for g in ds["goal"]:
      per_seed = ds["runs"][g["run"]]
      cuts = _cut_rows(per_seed)
      md.append(f"| {g['run']} | {g['split']} | {' / '.join(_pm(c['exit_acc']) for c in cuts)} | "
                f"{_pm(_run_means(per_seed)['full'])} | {'met' if g['met'] else 'not met'} | "
                f"{g['worst']['a']}: {_pm(g['worst']['difference'])} |")
    md.append("")
  if ds["server_costs"]:
    md += ["### Sequential against Averaging: the server's costs", "",
           "Server state: float32 parameters and SGD momentum of the server parts the "
           "server holds (Averaging: one per client; Sequential: one, from the shallowest "
           "cut). Server FLOPs: training FLOPs of every client's server-side work per round "
           "(`costs.cost_table`). Simulated time: `costs.simulated_round_seconds` with the "
           "device tiers below.", "",
           "| run | server parts | server state (MiB) | server train GFLOPs per round | "
           "simulated s per round | mean `exit_acc` | mean `full_acc` |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in ds["server_costs"]:
      md.append(f"| {c['run']} | {c['server_parts']} | {c['server_state_bytes'] / 2**20:.2f} | "
                f"{c['server_train_flops_per_round'] / 1e9:,.1f} | "
                f"{c['simulated_seconds_per_round']:.1f} | {_pm(c['mean_exit_acc'])} | "
                f"{_pm(c['mean_full_acc'])} |")
    md.append("")
  return md


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
    _save(plt, fig, out / f"{ds_name}_exit_accuracy.png")
    # test accuracy against round, simulated time and bytes on the link
    for kind, label in (("round", "round"), ("simulated", "simulated seconds"),
                        ("bytes", "bytes sent on the link")):
      splits = [("IID", lambda n: not n.endswith("-noniid"))]
      if any(n.endswith("-noniid") for n in runs):
        splits.append(("non-IID", lambda n: n.endswith("-noniid")))
      fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
      for ax, (split, mine) in zip(axes[0], splits):
        for name, per_seed in runs.items():
          curve = _time_curve(per_seed, kind, ds["simulated"].get(name, [])) if mine(name) else None
          if curve is None:
            continue
          xs, full, exit_ = curve
          line, = ax.plot(xs, full, marker="o", ms=3, label=f"{name} full")
          ax.plot(xs, exit_, ls="--", color=line.get_color(), label=f"{name} exit")
        ax.set_xlabel(label)
        ax.set_ylabel("mean test accuracy over clients and seeds")
        ax.legend(fontsize=5, ncol=2)
        ax.set_title(f"{ds_name} ({split}): test accuracy against {label}")
      _save(plt, fig, out / f"{ds_name}_accuracy_vs_{kind}.png")
    # entropy early-exit curves
    names = [n for n in ("hsee-averaging", "hsee-sequential") if n in runs]
    if names:
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
      _save(plt, fig, out / f"{ds_name}_early_exit.png")
    _claim_plots(plt, ds_name, ds, out)
    _variant_plot(plt, ds_name, ds, out)


_MARK = {"holds (better)": "▲", "holds (within the spread)": "=", "does not hold": "✗",
         "equal in every seed": "="}


def _cells(ds: dict):
  """``cell((claim, run, cut))``: that comparison's paired difference in
  points and its mark (▲ = ✗), or "" where the grid has none."""
  rows = {(v["claim"], v["a_run"], v["cut"]): v for v in ds["verdicts"]}
  return lambda key: ("" if key not in rows else
                      f"{rows[key]['difference'][0] * 100:+.1f} {_MARK.get(rows[key]['verdict'], '?')}")


def _splits(runs: dict, names, reference: str = ""):
  """(name, run, split label, the ``reference`` run of that split) of each of
  ``names`` on IID and non-IID data that ``runs`` holds (with its reference)."""
  for name in names:
    for sfx in ("", "-noniid"):
      if name + sfx in runs and (not reference or reference + sfx in runs):
        yield name, name + sfx, "non-IID" if sfx else "IID", reference + sfx


def _variants_table(ds: dict) -> list[str]:
  """Claims 5-7 in one table: per run and split, the paired differences in
  points (mean over seeds; ▲ better, = within the spread, ✗ worse by the
  verdict rule) against alone per tier, against homogeneous-weak at the
  weak tier, and against plain Averaging per tier and on the full path."""
  cell = _cells(ds)
  md = ["### Exit-aware variants: paired differences (points)", "",
        "Mean over seeds of a - b, in points; ▲ better, = within the spread (not worse), "
        "✗ worse (the verdict rule above).", "",
        "| run | split | exit − alone, cut 3 / 5 / 7 | weak exit − homogeneous-weak | "
        "exit − plain Averaging, cut 3 / 5 / 7 | `full_acc` − plain Averaging |",
        "| --- | --- | --- | --- | --- | --- |"]
  for name, run, split, _ in _splits(ds["runs"], ["hsee-averaging"] + list(VARIANTS)):
    md.append(f"| {name} | {split} | "
              f"{' / '.join(cell((5, run, c)) for c in HETERO_CUTS)} | "
              f"{cell((6, run, HETERO_CUTS[0]))} | "
              f"{' / '.join(cell((7, run, c)) for c in HETERO_CUTS) if name in VARIANTS else ''} | "
              f"{cell((7, run, None))} |")
  return md + [""]


def _trained_per_cut(run: dict) -> dict:
  """Cut -> clients that trained, summed over the run's rounds."""
  out: dict = {}
  for rec in run["records"]:
    for c in rec.get("train_per_client", []):
      out[c["cut"]] = out.get(c["cut"], 0) + 1
  return out


def _time_to(run: dict, target: float) -> float | None:
  """Simulated seconds until the run's mean full-path accuracy first reaches ``target``."""
  t = 0.0
  for rec in run["records"]:
    if "round" not in rec or "train" not in rec:
      continue
    t += rec.get("sim_seconds", 0.0)
    if "test" in rec and rec["test"]["mean_full_acc"] >= target:
      return t
  return None


def _iot_tables(ds: dict) -> list[str]:
  """The IoT grid (claims 8-9) as three tables: what each link setting costs
  and saves, how long each participation rule takes to reach everyone's
  accuracy, and each tier's exit and participation under a deadline."""
  runs, cell = ds["runs"], _cells(ds)
  per_round = lambda run, key: float(np.mean([np.mean([rec[key] for rec in r["records"] if key in rec])
                                              for r in runs[run]]))
  md = ["### The link: accuracy lost and bytes saved", "",
        "Paired differences in points against `everyone` (the activations as computed, "
        "float32); ▲ better, = within the spread, ✗ worse. Bytes: everything on the link in "
        "a round (activations, the aggregation's client parts), mean over rounds and seeds.", "",
        "| link | split | `full_acc` | − everyone | bytes per round | bytes saved |",
        "| --- | --- | --- | --- | --- | --- |"]
  for name, run, split, ref in _splits(runs, ("everyone", "int8", "topk"), "everyone"):
    b, b0 = per_round(run, "bytes_sent"), per_round(ref, "bytes_sent")
    md.append(f"| {name} | {split} | {_pm(_run_means(runs[run])['full'])} | "
              f"{cell((8, run, None))} | {b / 1e6:.2f} MB | {b0 / b:.2f}x |")
  md += ["", "### Participation: simulated time to everyone's accuracy", "",
         "Time to reach: the simulated seconds until a run's mean full-path accuracy first "
         "reaches the final one of `everyone` on the same seed (evaluations every "
         f"{next(iter(runs.values()))[0]['config']['eval_every']} rounds; seeds that never "
         "reach it are counted apart).", "",
         "| rule | split | `full_acc` | − everyone | simulated s per round | "
         "simulated s to everyone's final `full_acc` |",
         "| --- | --- | --- | --- | --- | --- |"]
  for name, run, split, ref in _splits(runs, ("everyone", *IOT_RULES), "everyone"):
    targets = [r["summary"]["test"]["mean_full_acc"] for r in runs[ref]]
    times = [_time_to(r, t) for r, t in zip(runs[run], targets)]
    got = [t for t in times if t is not None]
    reach = (f"{np.mean(got):,.0f}" if got else "never") + \
        (f" ({len(got)} of {len(times)} seeds)" if len(got) < len(times) else "")
    md.append(f"| {name} | {split} | {_pm(_run_means(runs[run])['full'])} | "
              f"{cell((9, run, None))} | {per_round(run, 'sim_seconds'):.1f} | {reach} |")
  md += ["", "### Each tier under a deadline", "",
         "Each tier's exit (mean over seeds) and its paired difference against `everyone` "
         "in points; participation: the share of the tier's client-rounds that trained.", "",
         "| rule | split | exit at cut 3 / 5 / 7 | − everyone, cut 3 / 5 / 7 | "
         "participation, cut 3 / 5 / 7 |", "| --- | --- | --- | --- | --- |"]
  for name, run, split, ref in _splits(runs, ("everyone", *IOT_RULES), "everyone"):
    base = _trained_per_cut(runs[ref][0])
    share = [np.mean([_trained_per_cut(r).get(c, 0) / base[c] for r in runs[run]])
             for c in HETERO_CUTS]
    md.append(f"| {name} | {split} | "
              f"{' / '.join(_pm(_at_cut(runs, run, c)) for c in HETERO_CUTS)} | "
              f"{' / '.join(cell((9, run, c)) for c in HETERO_CUTS) if name != 'everyone' else ''} | "
              f"{' / '.join(f'{x:.0%}' for x in share)} |")
  return md + [""]


def _variant_plot(plt, ds_name: str, ds: dict, out: Path) -> None:
  """Every tier's exit and the full path per variant, beside alone,
  homogeneous-weak and plain Averaging, IID and non-IID."""
  runs = ds["runs"]
  if not any(v in runs for v in VARIANTS):
    return
  fig, axes = plt.subplots(2, 1, figsize=(12, 8.5), squeeze=False)
  for ax, sfx in zip(axes[:, 0], ("", "-noniid")):
    names = [n for n in ("alone", "homogeneous-weak", "hsee-averaging", *VARIANTS) if n + sfx in runs]
    _bars(ax, [f"exit at cut {c}" for c in HETERO_CUTS] + ["full path"],
          {n: [_at_cut(runs, n + sfx, c) for c in HETERO_CUTS] +
              [None if n == "alone" or n.startswith("homogeneous") else _run_means(runs[n + sfx])["full"]]
           for n in names})
    ax.set_title(f"{ds_name}: exit-aware variants ({'non-IID, Dirichlet(0.3)' if sfx else 'IID'})")
  _save(plt, fig, out / f"{ds_name}_variants.png")


def _time_curve(per_seed: list[dict], kind: str, simulated: list):
  """(x, mean full-path and mean exit accuracy) at each evaluation, means over
  seeds; x the round, the simulated seconds or the bytes on the link so far
  (each seed's own records; ``simulated``: per-round seconds for runs whose
  records predate them). None where the records cannot give x."""
  xs, full, exit_ = [], [], []
  for r in per_seed:
    rounds = [rec for rec in r["records"] if "round" in rec and "train" in rec]
    tests = [rec for rec in rounds if "test" in rec]
    if not tests:
      return None
    if kind == "round":
      x = [rec["round"] + 1 for rec in tests]
    else:
      key = "sim_seconds" if kind == "simulated" else "bytes_sent"
      per_round = ([rec[key] for rec in rounds] if all(key in rec for rec in rounds)
                   else simulated if kind == "simulated" else None)
      if per_round is None or len(per_round) < len(rounds):
        return None
      cum = np.cumsum(per_round)
      x = [cum[i] for i, rec in enumerate(rounds) if "test" in rec]
    xs.append(x)
    full.append([rec["test"]["mean_full_acc"] for rec in tests])
    exit_.append([rec["test"]["mean_exit_acc"] for rec in tests])
  n = min(map(len, xs))
  return tuple(np.mean([v[:n] for v in vals], axis=0) for vals in (xs, full, exit_))


def _save(plt, fig, path: Path) -> None:
  """Write a finished figure (tight layout, 110 dpi) and free it."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _bars(ax, groups: list[str], series: dict) -> None:
  """Grouped bars: ``series[label]`` is one (mean, std) or None per group."""
  import matplotlib
  width = 0.8 / max(1, len(series))
  # past the default cycle's 10 colours, one of 20 (no two series share one)
  colours = [None] * len(series) if len(series) <= 10 else \
      [matplotlib.colormaps["tab20"](j) for j in range(len(series))]
  for j, (label, values) in enumerate(series.items()):
    xs = [i + (j - (len(series) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
    ms = [v for v in values if v is not None]
    ax.bar(xs, [m[0] for m in ms], width, yerr=[m[1] if np.isfinite(m[1]) else 0 for m in ms],
           capsize=2, label=label, color=colours[j])
  ax.set_xticks(range(len(groups)), groups, fontsize=7)
  ax.set_ylabel("test accuracy (mean ± std over seeds)")
  if len(series) > 6:  # beside the bars, not over them
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  else:
    ax.legend(fontsize=7)


def _at_cut(runs: dict, name: str, cut: int, metric: str = "exit_acc"):
  if name not in runs:
    return None
  return next((c[metric] for c in _cut_rows(runs[name]) if c["cut"] == cut), None)


def _curve(per_seed: list[dict], metric: str):
  """Rounds and the mean and std over seeds of a test metric at each evaluation."""
  by_seed = [[rec for rec in r["records"] if "test" in rec] for r in per_seed]
  xs = [rec["round"] + 1 for rec in by_seed[0]]
  ys = np.asarray([[rec["test"][metric] for rec in rs] for rs in by_seed])
  return xs, ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(xs))


def _claim_plots(plt, ds_name: str, ds: dict, out: Path) -> None:
  """One plot per claim that the grid's runs can show, and the convergence curve."""
  runs = ds["runs"]
  # 1: the full path of every run
  names = [n for n in runs if not n.endswith("-noniid")]
  fig, ax = plt.subplots(figsize=(8, 4))
  _bars(ax, names, {"full path (fleet mean)": [_run_means(runs[n])["full"] for n in names]})
  ax.set_title(f"{ds_name}, claim 1: the shared network's accuracy (IID)")
  ax.tick_params(axis="x", rotation=30)
  _save(plt, fig, out / f"{ds_name}_claim1_full_path.png")
  # 2: each tier's exit, alone and in collaboration, IID and non-IID
  splits = [sfx for sfx in ("", "-noniid") if f"alone{sfx}" in runs]
  if splits:
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, sfx in zip(axes[0], splits):
      _bars(ax, [f"cut {c}" for c in HETERO_CUTS],
            {n: [_at_cut(runs, n + sfx, c) for c in HETERO_CUTS]
             for n in ("alone", "hsee-averaging", "hsee-sequential")
             if n + sfx in runs})
      ax.set_title(f"claim 2: exit accuracy per tier ({'non-IID' if sfx else 'IID'})")
    _save(plt, fig, out / f"{ds_name}_claim2_exits_vs_alone.png")
  # 3: exits per tier with and without the other tiers
  names = [n for n in ("hsee-averaging", "homogeneous-weak", "strong-only") if n in runs]
  if len(names) > 1:
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, [f"exit at cut {c}" for c in HETERO_CUTS] + ["full path"],
          {n: [_at_cut(runs, n, c) for c in HETERO_CUTS] + [_run_means(runs[n])["full"]]
           for n in names})
    ax.set_title(f"{ds_name}, claim 3: heterogeneous fleet, weak tier only, weak tier left out")
    _save(plt, fig, out / f"{ds_name}_claim3_heterogeneity.png")
  # 4: server state and simulated time, Sequential against Averaging
  costs_ = ds["server_costs"]
  if costs_:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [c["run"] for c in costs_]
    axes[0].bar(labels, [c["server_state_bytes"] / 2**20 for c in costs_], color="tab:purple")
    axes[0].set_ylabel("server state (MiB)")
    ax2 = axes[0].twinx()
    ax2.plot(labels, [c["simulated_seconds_per_round"] for c in costs_], "ko-")
    ax2.set_ylabel("simulated seconds per round (dots)")
    axes[0].tick_params(axis="x", rotation=30, labelsize=7)
    for c in costs_:
      per = ds["simulated"][c["run"]]
      xs, ys, sd = _curve(runs[c["run"]], "mean_exit_acc")
      t = [sum(per[:r]) for r in xs]
      axes[1].errorbar(t, ys, yerr=sd, capsize=2, label=f"{c['run']} exit (fleet mean)")
    axes[1].set_xlabel("simulated seconds")
    axes[1].set_ylabel("test accuracy")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{ds_name}, claim 4: Sequential against Averaging")
    _save(plt, fig, out / f"{ds_name}_claim4_sequential_vs_averaging.png")
  # convergence: test accuracy against round, mean ± std over seeds
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, metric in (("central", "mean_full_acc"), ("hsee-averaging", "mean_full_acc"),
                       ("hsee-averaging", "mean_exit_acc"), ("alone", "mean_exit_acc"),
                       ("hsee-sequential", "mean_exit_acc")):
    if name in runs:
      xs, ys, sd = _curve(runs[name], metric)
      ax.plot(xs, ys, marker=".", label=f"{name} {metric}")
      ax.fill_between(xs, ys - sd, ys + sd, alpha=0.2)
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy (mean ± std over seeds)")
  ax.legend(fontsize=7)
  ax.set_title(f"{ds_name}: test accuracy against round")
  _save(plt, fig, out / f"{ds_name}_convergence.png")


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
