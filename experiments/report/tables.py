"""``results.md``: the common tables of every grid, then the sections its
``REPORT`` names (:data:`SECTIONS`: ``paired``, ``goal``, ``link_and_participation``)."""
from __future__ import annotations

import numpy as np

from grids.common import HETERO_CUTS, TIERS
from report.verdicts import VERDICT_RULE, at_cut, cut_rows, pm, run_means


def markdown(results: dict, rows: list[dict], grid) -> str:
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
      cuts, means = cut_rows(per_seed), run_means(per_seed)
      md.append(f"| {name} | {rs[0]['strategy']} | {', '.join(str(r['cut']) for r in rs)} | "
                f"{' / '.join(pm(c['exit_acc']) for c in cuts)} | "
                f"{' / '.join(pm(c['full_acc']) for c in cuts)} | "
                f"{pm(means['exit'])} | {pm(means['full'])} | {rs[0]['wall_seconds']} | "
                f"{rs[0]['simulated_seconds']} |")
    md += ["", "`central` has one client holding the whole network (its 'full' is the uncut "
           "ResNet-18); `classical-split` and `central` train no exit head (exit_loss_weight 0), "
           "so their exit accuracies are not meaningful.", ""]
    md += claims_markdown(ds_name, ds, grid)
    md += _early_exit(ds) + _costs(ds)
  return "\n".join(md)


def claims_markdown(ds_name: str, ds: dict, grid) -> list[str]:
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
      md.append(f"| {v['claim']} | {v['a']} | {want} {v['b']} | {pm(v['a_value'])} | "
                f"{pm(v['b_value'])} | {pm(v['difference'])} | {v['verdict']} |")
    md += ["", "Claims: " + "; ".join(f"{k}. {text}" for k, text, _ in grid.CLAIMS
                                       if any(v["claim"] == k for v in ds["verdicts"])) + ".", ""]
    for name, params in grid.REPORT:
      if name in SECTIONS:
        md += SECTIONS[name](ds, **params)
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
                f"{c['simulated_seconds_per_round']:.1f} | {pm(c['mean_exit_acc'])} | "
                f"{pm(c['mean_full_acc'])} |")
    md.append("")
  return md


def _early_exit(ds: dict) -> list[str]:
  hsee = [n for n in ("hsee-averaging", "hsee-sequential") if n in ds["runs"]]
  if not hsee:
    return []
  taus = [r["threshold"] for r in cut_rows(ds["runs"][hsee[0]])[0]["early_exit"]]
  md = ["### Entropy early exit (Hetero-SplitEE runs)", "",
        "Accuracy / share of samples answered at the client, per threshold tau "
        "(means over seeds).", "",
        "| run | clients (cut) | " + " | ".join(f"tau {t:g}" for t in taus) + " |",
        "| --- | --- | " + " | ".join("---" for _ in taus) + " |"]
  for name in hsee:
    for c in cut_rows(ds["runs"][name]):
      md.append(f"| {name} | {c['client']} ({c['cut']}) | " + " | ".join(
          f"{r['accuracy']:.3f} / {r['client_fraction']:.2f}" for r in c["early_exit"]) + " |")
  return md


def _costs(ds: dict) -> list[str]:
  md = ["", "### Cost per cut layer (per training image, computed from the model)", "",
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
  return md + [""]


_MARK = {"holds (better)": "▲", "holds (within the spread)": "=", "does not hold": "✗",
         "equal in every seed": "="}


def _cells(ds: dict):
  """``cell((claim, run, cut))``: that comparison's paired difference in
  points and its mark (▲ = ✗), or "" where the grid has none."""
  rows = {(v["claim"], v["a_run"], v["cut"]): v for v in ds["verdicts"]}
  return lambda key: ("" if key not in rows else
                      f"{rows[key]['difference'][0] * 100:+.1f} {_MARK.get(rows[key]['verdict'], '?')}")


def splits(runs: dict, names, reference: str = ""):
  """(name, run, split label, the ``reference`` run of that split) of each of
  ``names`` on IID and non-IID data that ``runs`` holds (with its reference)."""
  for name in names:
    for sfx in ("", "-noniid"):
      if name + sfx in runs and (not reference or reference + sfx in runs):
        yield name, name + sfx, "non-IID" if sfx else "IID", reference + sfx


def paired(ds: dict, title: str, runs, columns) -> list[str]:
  """One table of paired differences: per run and split, each column's
  claim at its cuts (``columns``: (heading, claim, cuts); cut None the
  fleet mean), in points (mean over seeds; ▲ better, = within the spread,
  ✗ worse by the verdict rule)."""
  cell = _cells(ds)
  md = [f"### {title}", "",
        "Mean over seeds of a - b, in points; ▲ better, = within the spread (not worse), "
        "✗ worse (the verdict rule above).", "",
        "| run | split | " + " | ".join(h for h, _, _ in columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
  for name, run, split, _ in splits(ds["runs"], runs):
    cols = [" / ".join(cell((claim, run, c)) for c in cuts) for _, claim, cuts in columns]
    md.append(f"| {name} | {split} | " + " | ".join(
        "" if not any(cell((claim, run, c)) for c in cuts) else col
        for col, (_, claim, cuts) in zip(cols, columns)) + " |")
  return md + [""]


def goal_table(ds: dict, runs=()) -> list[str]:
  if not ds.get("goal"):
    return []
  md = ["### The goal: every tier served", "",
        "Met when none of the run's comparisons does not hold: on non-IID data every "
        "tier's exit ≥ alone, the weak exit ≥ homogeneous-weak, exits and full path ≥ "
        "plain Averaging (claims 5-7); on IID data the last. Worst: the lowest paired "
        "difference among them.", "",
        "| run | split | exit per cut (3 / 5 / 7) | `full_acc` | goal | worst comparison (a - b) |",
        "| --- | --- | --- | --- | --- | --- |"]
  for g in ds["goal"]:
    per_seed = ds["runs"][g["run"]]
    cuts = cut_rows(per_seed)
    md.append(f"| {g['run']} | {g['split']} | {' / '.join(pm(c['exit_acc']) for c in cuts)} | "
              f"{pm(run_means(per_seed)['full'])} | {'met' if g['met'] else 'not met'} | "
              f"{g['worst']['a']}: {pm(g['worst']['difference'])} |")
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


def link_and_participation(ds: dict, reference: str, links, link_claim: int, rules,
                           rule_claim: int) -> list[str]:
  """Three tables: what each link setting costs and saves, how long each
  participation rule takes to reach the reference's accuracy, and each
  tier's exit and participation under a deadline."""
  runs, cell = ds["runs"], _cells(ds)
  per_round = lambda run, key: float(np.mean([np.mean([rec[key] for rec in r["records"] if key in rec])
                                              for r in runs[run]]))
  md = ["### The link: accuracy lost and bytes saved", "",
        f"Paired differences in points against `{reference}` (the activations as computed, "
        "float32); ▲ better, = within the spread, ✗ worse. Bytes: everything on the link in "
        "a round (activations, the aggregation's client parts), mean over rounds and seeds.", "",
        f"| link | split | `full_acc` | − {reference} | bytes per round | bytes saved |",
        "| --- | --- | --- | --- | --- | --- |"]
  for name, run, split, ref in splits(runs, (reference, *links), reference):
    b, b0 = per_round(run, "bytes_sent"), per_round(ref, "bytes_sent")
    md.append(f"| {name} | {split} | {pm(run_means(runs[run])['full'])} | "
              f"{cell((link_claim, run, None))} | {b / 1e6:.2f} MB | {b0 / b:.2f}x |")
  md += ["", f"### Participation: simulated time to {reference}'s accuracy", "",
         "Time to reach: the simulated seconds until a run's mean full-path accuracy first "
         f"reaches the final one of `{reference}` on the same seed (evaluations every "
         f"{next(iter(runs.values()))[0]['config']['eval_every']} rounds; seeds that never "
         "reach it are counted apart).", "",
         f"| rule | split | `full_acc` | − {reference} | simulated s per round | "
         f"simulated s to {reference}'s final `full_acc` |",
         "| --- | --- | --- | --- | --- | --- |"]
  for name, run, split, ref in splits(runs, (reference, *rules), reference):
    targets = [r["summary"]["test"]["mean_full_acc"] for r in runs[ref]]
    times = [_time_to(r, t) for r, t in zip(runs[run], targets)]
    got = [t for t in times if t is not None]
    reach = (f"{np.mean(got):,.0f}" if got else "never") + \
        (f" ({len(got)} of {len(times)} seeds)" if len(got) < len(times) else "")
    md.append(f"| {name} | {split} | {pm(run_means(runs[run])['full'])} | "
              f"{cell((rule_claim, run, None))} | {per_round(run, 'sim_seconds'):.1f} | {reach} |")
  md += ["", "### Each tier under a deadline", "",
         f"Each tier's exit (mean over seeds) and its paired difference against `{reference}` "
         "in points; participation: the share of the tier's client-rounds that trained.", "",
         f"| rule | split | exit at cut 3 / 5 / 7 | − {reference}, cut 3 / 5 / 7 | "
         "participation, cut 3 / 5 / 7 |", "| --- | --- | --- | --- | --- |"]
  for name, run, split, ref in splits(runs, (reference, *rules), reference):
    base = _trained_per_cut(runs[ref][0])
    share = [np.mean([_trained_per_cut(r).get(c, 0) / base[c] for r in runs[run]])
             for c in HETERO_CUTS]
    md.append(f"| {name} | {split} | "
              f"{' / '.join(pm(at_cut(runs, run, c)) for c in HETERO_CUTS)} | "
              f"{' / '.join(cell((rule_claim, run, c)) for c in HETERO_CUTS) if name != reference else ''} | "
              f"{' / '.join(f'{x:.0%}' for x in share)} |")
  return md + [""]


SECTIONS = {"paired": paired, "goal": goal_table,
            "link_and_participation": link_and_participation}
