"""Verdicts on a grid's claims, paired by seed, and the figures the tables
draw on: per-cut rows, run means, convergence, the server's costs, the goal."""
from __future__ import annotations

import numpy as np

from hsee_jax import sweep

VERDICT_RULE = ("paired by seed (the runs of a seed share data, partition and initial "
                "weights): d = a - b per seed, its mean and standard error se = sd / sqrt(n); "
                "*better* holds when mean d > 2 se and does not hold when mean d < -2 se; "
                "*not worse* holds when mean d > -2 se (better, or within the spread) and "
                "does not hold when mean d < -2 se; otherwise the two cannot be told apart "
                "from the spread. One seed gives no spread, hence no verdict; *equal in every "
                "seed* marks two runs that compute the same thing.")


def pm(ms, digits: int = 3) -> str:
  mean, std = ms
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def cut_rows(per_seed: list[dict]) -> list[dict]:
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


def run_means(per_seed: list[dict]) -> dict:
  """Mean exit and full-path accuracy over the fleet: mean and std over seeds."""
  tests = [r["summary"]["test"] for r in per_seed]
  return {"exit": sweep.mean_std([t["mean_exit_acc"] for t in tests]),
          "full": sweep.mean_std([t["mean_full_acc"] for t in tests])}


def at_cut(runs: dict, name: str, cut: int, metric: str = "exit_acc"):
  if name not in runs:
    return None
  return next((c[metric] for c in cut_rows(runs[name]) if c["cut"] == cut), None)


def _value(run: dict, metric: str, cut: int | None) -> float:
  """One finished run's final test accuracy: the fleet mean, or the mean over
  the clients of one cut."""
  test = run["summary"]["test"]
  if cut is None:
    return test[f"mean_{metric}"]
  return next(c[metric]["mean"] for c in test["cuts"] if c["cut"] == cut)


def _label(run: str, metric: str, cut: int | None) -> str:
  return f"{run} {metric}" + (f" at cut {cut}" if cut is not None else " (fleet mean)")


def verdicts(runs: dict, claims: list) -> list[dict]:
  """Each claim's comparisons on one dataset's finished runs (``runs``: run
  name -> one finished run per seed): both sides' mean ± std over seeds, the
  paired difference and the verdict (:data:`VERDICT_RULE`). Comparisons
  whose runs (or cuts) are not in ``runs`` are left out."""
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
    means = run_means(per_seed)
    sim = ds["simulated"][name]
    out.append({"run": name, "strategy": cfg["strategy"],
                "server_parts": len(held),
                "server_state_bytes": int(sum(2 * 4 * table[c]["server_params"] for c in held)),
                "server_train_flops_per_round": float(sum(
                    steps * cfg["batch_size"] * table[c]["server_train_flops"] for c in cuts)),
                "simulated_seconds_per_round": sum(sim) / max(1, len(sim)),
                "mean_exit_acc": means["exit"], "mean_full_acc": means["full"]})
  return out


def goal(rows: list[dict], runs, claims: dict) -> list[dict]:
  """The goal per run of ``runs`` and split, from the verdicts ``rows``: met
  when none of its comparisons in ``claims[split]`` (claim numbers; splits
  "IID" and "non-IID") "does not hold". ``worst``: the lowest paired
  difference among them."""
  out = []
  for name in runs:
    for sfx, split in (("", "IID"), ("-noniid", "non-IID")):
      mine = [r for r in rows if r["a_run"] == name + sfx and r["claim"] in claims[split]]
      if not mine:
        continue
      worst = min(mine, key=lambda r: r["difference"][0])
      out.append({"run": name + sfx, "split": split,
                  "met": not any(r["verdict"] == "does not hold" for r in mine),
                  "failing": [f"{r['a']} vs {r['b']}" for r in mine if r["verdict"] == "does not hold"],
                  "worst": {"a": f"{worst['a']} vs {worst['b']}",
                            "difference": worst["difference"]}})
  return out
