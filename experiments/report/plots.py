"""The plots of a grid: the common ones (accuracy per exit, accuracy
against round, simulated time and bytes, the entropy early exit) and those
its ``REPORT`` names (:data:`PLOTS`: ``claim_plots``, ``variant_plot``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from grids.common import HETERO_CUTS
from report.verdicts import at_cut, cut_rows, run_means


def plots(results: dict, out: Path, grid, log=print) -> None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log("[reproduce] matplotlib not installed (pip install -e '.[plot]'): no plots")
    return
  for ds_name, ds in results["datasets"].items():
    _exit_bars(plt, ds_name, ds, out)
    _time_plots(plt, ds_name, ds, out)
    _early_exit(plt, ds_name, ds, out)
    for name, params in grid.REPORT:
      if name in PLOTS:
        PLOTS[name](plt, ds_name, ds, out, **params)


def _exit_bars(plt, ds_name: str, ds: dict, out: Path) -> None:
  """Accuracy per client exit (and the full path) for each run."""
  fig, ax = plt.subplots(figsize=(9, 4))
  x, ticks, labels = 0, [], []
  err = lambda ms: ms[1] if np.isfinite(ms[1]) else 0.0
  for name, per_seed in ds["runs"].items():
    for c in cut_rows(per_seed):
      ax.bar(x - 0.2, c["exit_acc"][0], 0.4, yerr=err(c["exit_acc"]), capsize=2, color="tab:blue")
      ax.bar(x + 0.2, c["full_acc"][0], 0.4, yerr=err(c["full_acc"]), capsize=2, color="tab:orange")
      ticks.append(x)
      labels.append(f"{name}\nl={c['cut']}")
      x += 1
    x += 0.5
  ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
  ax.set_ylabel("test accuracy")
  ax.legend(["exit head", "full path"], fontsize=8)
  ax.set_title(f"{ds_name}: accuracy per client exit (mean ± std over seeds)")
  save(plt, fig, out / f"{ds_name}_exit_accuracy.png")


def _time_plots(plt, ds_name: str, ds: dict, out: Path) -> None:
  """Test accuracy against round, simulated time and bytes on the link."""
  runs = ds["runs"]
  for kind, label in (("round", "round"), ("simulated", "simulated seconds"),
                      ("bytes", "bytes sent on the link")):
    splits = [("IID", lambda n: not n.endswith("-noniid"))]
    if any(n.endswith("-noniid") for n in runs):
      splits.append(("non-IID", lambda n: n.endswith("-noniid")))
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, (split, mine) in zip(axes[0], splits):
      for name, per_seed in runs.items():
        curve = time_curve(per_seed, kind, ds["simulated"].get(name, [])) if mine(name) else None
        if curve is None:
          continue
        xs, full, exit_ = curve
        line, = ax.plot(xs, full, marker="o", ms=3, label=f"{name} full")
        ax.plot(xs, exit_, ls="--", color=line.get_color(), label=f"{name} exit")
      ax.set_xlabel(label)
      ax.set_ylabel("mean test accuracy over clients and seeds")
      ax.legend(fontsize=5, ncol=2)
      ax.set_title(f"{ds_name} ({split}): test accuracy against {label}")
    save(plt, fig, out / f"{ds_name}_accuracy_vs_{kind}.png")


def _early_exit(plt, ds_name: str, ds: dict, out: Path) -> None:
  """Entropy early-exit curves of the Hetero-SplitEE runs."""
  runs = ds["runs"]
  names = [n for n in ("hsee-averaging", "hsee-sequential") if n in runs]
  if not names:
    return
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    for c in cut_rows(runs[name]):
      ee = c["early_exit"]
      ax.plot([r["client_fraction"] for r in ee], [r["accuracy"] for r in ee], marker=".",
              label=f"cut {c['cut']} ({c['client']})")
    ax.set_xlabel("share of samples answered at the client")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{ds_name} {name}: entropy early exit")
    ax.legend(fontsize=7)
  save(plt, fig, out / f"{ds_name}_early_exit.png")


def variant_plot(plt, ds_name: str, ds: dict, out: Path, runs=()) -> None:
  """Every tier's exit and the full path of each of ``runs``, IID and
  non-IID (no full path for alone and the homogeneous fleets)."""
  have = ds["runs"]
  fig, axes = plt.subplots(2, 1, figsize=(12, 8.5), squeeze=False)
  for ax, sfx in zip(axes[:, 0], ("", "-noniid")):
    names = [n for n in runs if n + sfx in have]
    bars(ax, [f"exit at cut {c}" for c in HETERO_CUTS] + ["full path"],
         {n: [at_cut(have, n + sfx, c) for c in HETERO_CUTS] +
             [None if n == "alone" or n.startswith("homogeneous") else run_means(have[n + sfx])["full"]]
          for n in names})
    ax.set_title(f"{ds_name}: exit-aware variants ({'non-IID, Dirichlet(0.3)' if sfx else 'IID'})")
  save(plt, fig, out / f"{ds_name}_variants.png")


def time_curve(per_seed: list[dict], kind: str, simulated: list):
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


def save(plt, fig, path: Path) -> None:
  """Write a finished figure (tight layout, 110 dpi) and free it."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def bars(ax, groups: list[str], series: dict) -> None:
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


def curve(per_seed: list[dict], metric: str):
  """Rounds and the mean and std over seeds of a test metric at each evaluation."""
  by_seed = [[rec for rec in r["records"] if "test" in rec] for r in per_seed]
  xs = [rec["round"] + 1 for rec in by_seed[0]]
  ys = np.asarray([[rec["test"][metric] for rec in rs] for rs in by_seed])
  return xs, ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(len(xs))


def claim_plots(plt, ds_name: str, ds: dict, out: Path) -> None:
  """One plot per claim of the paper that the grid's runs can show, and the convergence curve."""
  runs = ds["runs"]
  # 1: the full path of every run
  names = [n for n in runs if not n.endswith("-noniid")]
  fig, ax = plt.subplots(figsize=(8, 4))
  bars(ax, names, {"full path (fleet mean)": [run_means(runs[n])["full"] for n in names]})
  ax.set_title(f"{ds_name}, claim 1: the shared network's accuracy (IID)")
  ax.tick_params(axis="x", rotation=30)
  save(plt, fig, out / f"{ds_name}_claim1_full_path.png")
  # 2: each tier's exit, alone and in collaboration, IID and non-IID
  splits = [sfx for sfx in ("", "-noniid") if f"alone{sfx}" in runs]
  if splits:
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, sfx in zip(axes[0], splits):
      bars(ax, [f"cut {c}" for c in HETERO_CUTS],
           {n: [at_cut(runs, n + sfx, c) for c in HETERO_CUTS]
            for n in ("alone", "hsee-averaging", "hsee-sequential") if n + sfx in runs})
      ax.set_title(f"claim 2: exit accuracy per tier ({'non-IID' if sfx else 'IID'})")
    save(plt, fig, out / f"{ds_name}_claim2_exits_vs_alone.png")
  # 3: exits per tier with and without the other tiers
  names = [n for n in ("hsee-averaging", "homogeneous-weak", "strong-only") if n in runs]
  if len(names) > 1:
    fig, ax = plt.subplots(figsize=(7, 4))
    bars(ax, [f"exit at cut {c}" for c in HETERO_CUTS] + ["full path"],
         {n: [at_cut(runs, n, c) for c in HETERO_CUTS] + [run_means(runs[n])["full"]]
          for n in names})
    ax.set_title(f"{ds_name}, claim 3: heterogeneous fleet, weak tier only, weak tier left out")
    save(plt, fig, out / f"{ds_name}_claim3_heterogeneity.png")
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
      xs, ys, sd = curve(runs[c["run"]], "mean_exit_acc")
      axes[1].errorbar([sum(per[:r]) for r in xs], ys, yerr=sd, capsize=2,
                       label=f"{c['run']} exit (fleet mean)")
    axes[1].set_xlabel("simulated seconds")
    axes[1].set_ylabel("test accuracy")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{ds_name}, claim 4: Sequential against Averaging")
    save(plt, fig, out / f"{ds_name}_claim4_sequential_vs_averaging.png")
  # convergence: test accuracy against round, mean ± std over seeds
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, metric in (("central", "mean_full_acc"), ("hsee-averaging", "mean_full_acc"),
                       ("hsee-averaging", "mean_exit_acc"), ("alone", "mean_exit_acc"),
                       ("hsee-sequential", "mean_exit_acc")):
    if name in runs:
      xs, ys, sd = curve(runs[name], metric)
      ax.plot(xs, ys, marker=".", label=f"{name} {metric}")
      ax.fill_between(xs, ys - sd, ys + sd, alpha=0.2)
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy (mean ± std over seeds)")
  ax.legend(fontsize=7)
  ax.set_title(f"{ds_name}: test accuracy against round")
  save(plt, fig, out / f"{ds_name}_convergence.png")


PLOTS = {"claim_plots": claim_plots, "variant_plot": variant_plot}
