"""The experiment grid runner, end to end on a tiny image-folder archive the test writes."""
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image_zip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import grids  # noqa: E402
import reproduce  # noqa: E402
from grids.common import EXAMPLES, GOAL, PAPER_CLAIMS, variant_claims  # noqa: E402
from report.plots import bars  # noqa: E402
from report.verdicts import goal, verdicts  # noqa: E402

# every variant of the three variants grids
VARIANTS = {**grids.GRIDS["variants"].VARIANTS, **grids.GRIDS["variants-more"].VARIANTS,
            **grids.GRIDS["variants-user"].VARIANTS}


@pytest.mark.long
def test_evidence_grid_on_tiny_image_folder(tmp_path, monkeypatch):
  """The evidence grid end to end: every run for two seeds, the tables, the
  verdict per claim from the finished runs, the plots, the skipped datasets."""
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # cifar100: no files, no tfds
  data = tmp_path / "tiny"
  data.mkdir()
  write_image_zip(data / "train.zip", ["a", "b", "c"], 16, size=(16, 16), seed=1)
  write_image_zip(data / "test.zip", ["a", "b", "c"], 4, size=(16, 16), seed=2)
  out = tmp_path / "out"
  broken = tmp_path / "stl10"   # present but truncated: skipped, and why
  broken.mkdir()
  (broken / "stl10_binary.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not a whole archive")
  args = ["--scale", "evidence", "--out", str(out), "--datasets", "imagefolder,cifar100,stl10",
          "--data-dir", f"imagefolder={data}", "--data-dir", f"cifar100={tmp_path / 'none'}",
          "--data-dir", f"stl10={broken}",
          "--set", "rounds=2", "--set", "eval_every=1", "--set", "batch_size=8",
          "--set", "local_steps=1", "--set", "train_subset=30", "--set", "eval_batch_size=12",
          "--seeds", "0,1"]
  assert reproduce.main(args) == 0
  rows = list(csv.DictReader(open(out / "results.csv")))
  assert {r["run"] for r in rows} == set(grids.GRIDS["evidence"].RUNS)
  # one row per run and cut
  assert len(rows) == sum(len(set(f["cuts"])) for f in grids.GRIDS["evidence"].RUNS.values())
  for r in rows:
    assert r["dataset"] == "imagefolder" and 0.0 <= float(r["exit_accuracy"]) <= 1.0
    assert int(r["rounds"]) == 2 and float(r["simulated_seconds"]) > 0 and r["seeds"] == "2"
  # every run trained once per seed, in its own run directory; the table is their mean ± std
  def summary(run, seed):
    return json.loads((out / "imagefolder" / run / f"seed{seed}" / "summary.json").read_text())
  def final_exit(run, seed, cut_index):
    summ = summary(run, seed)
    assert summ["config"]["seed"] == seed
    return summ["test"]["cuts"][cut_index]["exit_acc"]["mean"]
  avg = [r for r in rows if r["run"] == "hsee-averaging"]
  pair = [final_exit("hsee-averaging", s, 0) for s in (0, 1)]
  assert float(avg[0]["exit_accuracy"]) == pytest.approx(sum(pair) / 2, abs=1e-4)
  assert float(avg[0]["exit_accuracy_std"]) == pytest.approx(
      abs(pair[0] - pair[1]) / 2 ** 0.5, abs=1e-4)
  seq = [r for r in rows if r["run"] == "hsee-sequential"]
  assert [int(r["cut"]) for r in seq] == [3, 5, 7]
  # the weak tier left out: two thirds of the images, two clients
  assert summary("strong-only", 0)["config"]["train_subset"] == 20
  assert summary("strong-only", 0)["cuts"] == [5, 7]
  md = (out / "results.md").read_text()
  assert "cifar100 skipped: dataset cifar100: no files found" in md
  assert "stl10 skipped: dataset stl10: " in md and "is truncated or damaged" in md
  assert "### Cost per cut layer" in md and "mean ± sample standard deviation over the 2 seeds" in md
  assert " ± " in next(l for l in md.splitlines() if l.startswith("| hsee-averaging |"))
  assert "### Device budgets → cuts" in md and "### Simulated wall clock" in md
  # the verdicts, recomputed here from the finished runs' summaries
  claims = json.loads((out / "results.json").read_text())["claims"]["imagefolder"]
  verdict = next(v for v in claims["verdicts"] if v["a"] == "hsee-averaging exit_acc at cut 3"
                 and v["b"] == "alone exit_acc at cut 3")
  d = [final_exit("hsee-averaging", s, 0) - final_exit("alone", s, 0) for s in (0, 1)]
  assert verdict["difference"][0] == pytest.approx(np.mean(d))
  assert verdict["difference"][1] == pytest.approx(np.std(d, ddof=1) / 2 ** 0.5)
  assert {v["claim"] for v in claims["verdicts"]} == {1, 2, 3, 4}
  in_grid = [cmp for c in PAPER_CLAIMS for cmp in c[2]
             if {cmp[0], cmp[3]} <= set(grids.GRIDS["evidence"].RUNS)]   # e.g. no `homogeneous`
  assert len(claims["verdicts"]) == len(in_grid) < sum(len(c[2]) for c in PAPER_CLAIMS)
  lines = [l for l in md.splitlines() if l.startswith("| 2 | hsee-averaging-noniid exit_acc at cut 7")]
  assert len(lines) == 1 and lines[0].split("|")[-2].strip() == verdict_of(claims, lines[0])
  assert "### The paper's claims" in md and "### Convergence" in md
  costs = {c["run"]: c for c in claims["server_costs"]}
  assert costs["hsee-sequential"]["server_parts"] == 1 and costs["hsee-averaging"]["server_parts"] == 3
  assert costs["hsee-sequential"]["server_state_bytes"] < costs["hsee-averaging"]["server_state_bytes"]
  assert (costs["hsee-sequential"]["server_train_flops_per_round"]
          == costs["hsee-averaging"]["server_train_flops_per_round"])
  assert claims["convergence"]["run"] == "central" and claims["convergence"]["to_round"] == 2
  for png in ("exit_accuracy", "accuracy_vs_round", "accuracy_vs_simulated", "early_exit",
              "claim1_full_path", "claim2_exits_vs_alone", "claim3_heterogeneity",
              "claim4_sequential_vs_averaging", "convergence"):
    assert (out / f"imagefolder_{png}.png").stat().st_size > 1000
  summary_json = json.loads((out / "results.json").read_text())
  assert "cifar100" in summary_json["skipped"]
  # --resume keeps every finished run (nothing retrains: the summaries stay as they were)
  before = (out / "imagefolder" / "alone" / "seed1" / "summary.json").read_text()
  assert reproduce.main(args + ["--resume"]) == 0
  assert (out / "imagefolder" / "alone" / "seed1" / "summary.json").read_text() == before


def verdict_of(claims, line):
  a = line.split("|")[2].strip()
  return next(v["verdict"] for v in claims["verdicts"] if v["a"] == a)


def test_grids():
  """What each scale trains: the evidence grid's runs compare like with like."""
  cpu = dict(reproduce.grid("cifar10", "cpu", []))
  assert set(cpu) == set(grids.GRIDS["baseline"].RUNS) and all(c.rounds == 8 for c in cpu.values())
  ev = dict(reproduce.grid("cifar10", "evidence", []))
  assert set(ev) == set(grids.GRIDS["evidence"].RUNS)
  for name, cfg in ev.items():
    # the same recipe everywhere: network, rounds, batch, learning rate, seedless
    assert (cfg.width, cfg.rounds, cfg.batch_size, cfg.lr, cfg.local_steps) == (0.125, 40, 32, 0.05, 0)
    assert (cfg.schedule, cfg.eval_every) == ("step", 8)
    assert (cfg.partition, cfg.dirichlet_alpha) == (
        ("dirichlet", 0.3) if name.endswith("-noniid") else ("iid", cfg.dirichlet_alpha))
    # every split client holds the same number of images (the local steps follow)
    if name != "central":
      assert cfg.train_subset / len(cfg.cuts) == pytest.approx(2000 / 3, abs=1)
  assert ev["strong-only"].cuts == (5, 7) and ev["strong-only"].client_flops_per_s == (1e10, 5e10)
  assert ev["homogeneous-weak"].cuts == (3, 3, 3) and ev["alone"].aggregate_every > ev["alone"].rounds
  gpu = dict(reproduce.grid("cifar10", "gpu", []))
  assert set(gpu) == {"hsee-averaging", "hsee-sequential", "homogeneous-weak", "alone", "central"}
  assert all(c.width == 1.0 and c.train_subset == 0 for c in gpu.values())
  with pytest.raises(reproduce.config_lib.ConfigError, match="strong-only"):
    reproduce.grid("cifar10", "evidence", ["train_subset=0"])


def test_non_iid_split_is_the_same_for_every_run_of_a_seed():
  """The -noniid runs of one seed share their Dirichlet partition (and the
  IID runs theirs); another seed draws another."""
  from hsee_jax import data as data_lib
  from hsee_jax.fleet import build_fleet
  ds = data_lib.synthetic_dataset((8, 8, 10, 600, 10), 0)
  ev = dict(reproduce.grid("synthetic", "evidence", []))
  parts = lambda cfg, seed=0: build_fleet(reproduce.dataclasses.replace(cfg, seed=seed), ds).partitions
  a, b = parts(ev["hsee-averaging-noniid"]), parts(ev["alone-noniid"])
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert all(np.array_equal(x, y) for x, y in zip(a, parts(ev["homogeneous-weak-noniid"])))
  iid = parts(ev["hsee-averaging"])
  assert max(map(len, iid)) - min(map(len, iid)) <= 1
  assert max(map(len, a)) - min(map(len, a)) > 30   # Dirichlet(0.3): unequal sizes
  # skewed labels: some client holds under 5% of some class's images
  share = [np.bincount(ds.train_labels[p], minlength=10) / np.bincount(ds.train_labels, minlength=10)
           for p in a]
  assert np.min(share) < 0.05
  assert not all(np.array_equal(x, y) for x, y in zip(a, parts(ev["alone-noniid"], seed=1)))


def _fake_run(exits: dict, full: float) -> dict:
  cuts = [{"cut": c, "exit_acc": {"mean": e}, "full_acc": {"mean": full}} for c, e in exits.items()]
  return {"summary": {"test": {"cuts": cuts, "mean_exit_acc": float(np.mean(list(exits.values()))),
                               "mean_full_acc": full}}}


def test_verdicts_follow_the_rule():
  """Paired differences over seeds against twice their standard error."""
  runs = {
      "hsee-averaging": [_fake_run({3: 0.50 + e, 5: 0.55, 7: 0.60}, 0.70) for e in (0.0, 0.01, 0.02)],
      "alone": [_fake_run({3: 0.40 + e, 5: 0.55 + e, 7: 0.70}, 0.60) for e in (0.0, 0.02, 0.0)],
      "central": [_fake_run({1: 0.1}, f) for f in (0.70, 0.71, 0.69)],
  }
  v = {(r["a"], r["b"]): r for r in verdicts(runs, PAPER_CLAIMS)}
  tier = lambda run, c: f"{run} exit_acc at cut {c}"
  assert v[(tier("hsee-averaging", 3), tier("alone", 3))]["verdict"] == "holds"
  assert v[(tier("hsee-averaging", 5), tier("alone", 5))]["verdict"] == \
      "cannot be told apart from the spread"
  assert v[(tier("hsee-averaging", 7), tier("alone", 7))]["verdict"] == "does not hold"
  full = ("hsee-averaging full_acc (fleet mean)", "central full_acc (fleet mean)")
  assert v[full]["verdict"] == "holds (within the spread)" and v[full]["kind"] == "not_worse"
  assert v[(tier("hsee-averaging", 5), tier("hsee-averaging", 3))]["verdict"] == "holds"
  assert len(v) == 3 + 1 + 1 + 2   # claim 2 (tiers, full path), claim 1 (central), claim 3 (depth)
  one_seed = verdicts({k: r[:1] for k, r in runs.items()}, PAPER_CLAIMS)
  assert {r["verdict"] for r in one_seed if r["difference"][0] != 0} == {"one seed: no verdict"}
  same = verdicts({"hsee-sequential": runs["alone"], "alone": runs["alone"]}, PAPER_CLAIMS)
  assert {r["verdict"] for r in same} == {"equal in every seed"} and len(same) == 3


def test_variants_grid_and_goal():
  """The variants grid: its baselines are the evidence grid's configs; each
  variant is plain Averaging's config with its fields; the goal per run
  follows the verdicts of claims 5-7."""
  ev = dict(reproduce.grid("cifar10", "evidence", []))
  grids = [dict(reproduce.grid("cifar10", s, []))
           for s in ("variants", "variants-more", "variants-user")]
  baselines = ("hsee-averaging", "alone", "homogeneous-weak", "hsee-averaging-noniid",
               "alone-noniid", "homogeneous-weak-noniid")
  for va in grids[:2]:   # each grid: the evidence grid's baselines and its variants
    for name in baselines:
      assert va[name] == ev[name]
  for name in ("hsee-averaging", "hsee-averaging-noniid"):   # the user files' references
    assert grids[2][name] == ev[name]
  va = {**grids[0], **grids[1], **grids[2]}
  for v, fields in VARIANTS.items():   # every variant in one grid or another
    for sfx, base in (("", "hsee-averaging"), ("-noniid", "hsee-averaging-noniid")):
      assert va[v + sfx] == dataclasses.replace(ev[base], **fields)
  assert grids[2]["fedbn"].variants == (f"{EXAMPLES / 'fedbn.py'}:variant",)
  assert set(grids[2]) == {n + sfx for n in ("hsee-averaging", "every-exit", "fedbn", "depthfl-sum")
                           for sfx in ("", "-noniid")}
  assert len(grids[0]) + len(grids[1]) == 2 * 6 + 2 * (len(VARIANTS) - 2)
  assert len(va) == 6 + 2 * len(VARIANTS)
  noise = (0.0, 0.004, -0.004)
  seeds = lambda ex, full: [_fake_run({3: ex[0] + e, 5: ex[1] + e, 7: ex[2] - e}, full + e)
                            for e in noise]
  runs = {"alone": seeds((0.30, 0.37, 0.40), 0.40), "homogeneous-weak": seeds((0.34,) * 3, 0.45),
          "hsee-averaging": seeds((0.30, 0.36, 0.41), 0.455),
          "every-exit": seeds((0.35, 0.38, 0.42), 0.455),      # meets the IID goal
          "combined": seeds((0.36, 0.38, 0.42), 0.40)}         # full path worse
  runs.update({f"{n}-noniid": r for n, r in runs.items()})
  rows = verdicts(runs, variant_claims(VARIANTS))
  goals = {g["run"]: g for g in goal(rows, ["hsee-averaging", *VARIANTS], GOAL["claims"])}
  assert goals["every-exit"]["met"] and goals["every-exit-noniid"]["met"]
  assert not goals["combined"]["met"] and goals["combined"]["failing"] == [
      "combined full_acc (fleet mean) vs hsee-averaging full_acc (fleet mean)"]
  # plain Averaging: the weak exit below the all-weak fleet's
  assert not goals["hsee-averaging-noniid"]["met"]
  assert "hsee-averaging" not in goals   # on IID it is the reference itself


def test_grouped_bars_give_every_series_its_own_colour():
  """The variants plot has 11 series, past the default cycle's 10 colours:
  no two series share a colour, and the legend stands beside the bars."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots()
  series = {f"run{j}": [(0.3, 0.01), (0.4, 0.02)] for j in range(11)}
  bars(ax, ["exit", "full"], series)
  from matplotlib.container import BarContainer
  drawn = [c for c in ax.containers if isinstance(c, BarContainer)]
  colours = {tuple(c.patches[0].get_facecolor()) for c in drawn}
  assert len(drawn) == 11 and len(colours) == 11
  assert ax.get_legend().get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1
  plt.close(fig)


def test_iot_grids():
  """The IoT grids: ``iot-more`` trains the deadline shared among the tiers
  beside the same everyone and deadline runs as ``iot``; the claims judge
  every participation rule's tiers against everyone."""
  iot = dict(reproduce.grid("cifar10", "iot", []))
  more = dict(reproduce.grid("cifar10", "iot-more", []))
  assert len(iot) == 10 and len(more) == 6
  for name in ("everyone", "deadline", "everyone-noniid", "deadline-noniid"):
    assert more[name] == iot[name]
  for sfx in ("", "-noniid"):
    fair = more["deadline-by-tier" + sfx]
    assert fair.deadline_by_tier and dataclasses.replace(fair, deadline_by_tier=False) == \
        more["deadline" + sfx]
  judged = {(c[0], c[2]) for _, _, comps in grids.of_scale("iot-more").CLAIMS for c in comps}
  assert {("deadline-by-tier-noniid", cut) for cut in (3, 5, 7, None)} <= judged


def test_the_classical_column_and_the_clock_of_runs_recorded_without_it():
  """The cost table's server→client column (classical split learning) is the
  gradient's bytes from the cost table, and a run priced from its config
  aggregates when ``Config.aggregates_after`` says (Sequential with
  ``client_aggregation`` every 2 rounds: rounds 2 and 4 only)."""
  import types
  from hsee_jax import costs, models
  from hsee_jax.config import Config
  cfg = Config(width=0.125, strategy="sequential", mode="loop", client_aggregation="cross_layer",
               aggregate_every=2)
  net = models.for_config(cfg, 10)
  runs = {"seq": [{"config": cfg.to_dict(), "summary": {"cuts": [3, 5, 7], "local_steps": 2},
                   "records": [{"round": r, "train": {}} for r in range(4)]}]}
  ds = {"runs": runs}
  reproduce._account(ds, types.SimpleNamespace(num_classes=10, image_shape=(32, 32, 3)), cfg)
  for row in ds["costs"]:
    want = costs.cut_costs(net, row["cut"], (32, 32, 3), True)["bytes_server_to_client"]
    assert row["classical_bytes_server_to_client"] == want > 0
  t = ds["simulated"]["seq"]
  assert t[0] == t[2] < t[1] == t[3]


def test_a_grid_is_one_file_of_data_that_the_report_code_never_names():
  """Each grid file gives its name, scales, runs, claims and report
  sections (each section one the generic code has); the report code names
  no grid; no file under experiments/ is over 400 lines."""
  import ast
  from report import plots, tables
  experiments = Path(reproduce.__file__).parent
  files = {p.stem for p in (experiments / "grids").glob("*.py")} - {"__init__", "common"}
  assert {g.__name__.split(".")[-1] for g in grids.GRIDS.values()} == files
  for name, g in grids.GRIDS.items():
    assert g.NAME == name and g.RUNS and g.SCALES and isinstance(g.CLAIMS, list)
    for section, params in g.REPORT:
      assert section in tables.SECTIONS or section in plots.PLOTS, (name, section)
    for _, _, comparisons in g.CLAIMS:
      for a, _, _, b, _, _, kind in comparisons:
        assert kind in ("better", "not_worse")
  assert set(reproduce.SCALES) >= {"cpu", "paper", "evidence", "gpu", "iot", "variants"}
  for path in (experiments / "report").glob("*.py"):
    named = {n.value for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not named & set(grids.GRIDS), (path.name, named & set(grids.GRIDS))
  for path in experiments.rglob("*.py"):
    assert len(path.read_text().splitlines()) <= 400, path
