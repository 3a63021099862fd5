"""Sweeps: grid x seeds as ordinary runs, one compilation per batch, results
with mean ± std, and an exact resume."""
import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest

from hsee_jax import cli, strategies, sweep
from hsee_jax import train as train_lib
from hsee_jax.config import Config, ConfigError
from hsee_jax.rundir import RunError

BASE = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 32), width=0.125, cuts=(2, 4),
              batch_size=8, local_steps=2, rounds=2, eval_batch_size=32, checkpoint_every=1,
              mode="loop", schedule="constant")


def test_grid_and_seeds_parse_with_one_line_errors():
  grid = sweep.parse_grid(["lr=0.05,0.1", "cuts=(3,5,7),(5,5,5)", "strategy=averaging,sequential"])
  assert grid == {"lr": [0.05, 0.1], "cuts": [(3, 5, 7), (5, 5, 5)],
                  "strategy": ["averaging", "sequential"]}
  assert sweep.parse_seeds("0,1,2") == [0, 1, 2]
  for specs, msg in [(["lrr=0.1"], "unknown config field 'lrr'"),
                     (["seed=1,2"], "give seeds with --seeds"),
                     (["lr=0.1,0.1"], "need distinct values"),
                     (["lr"], "expected field=value"),
                     (["lr=0.1", "lr=0.2"], "given twice")]:
    with pytest.raises(ConfigError, match=msg):
      sweep.parse_grid(specs)
  with pytest.raises(ConfigError, match="expected integers"):
    sweep.parse_seeds("0,x")
  with pytest.raises(ConfigError, match="grid point lr=-1: lr: must be > 0"):
    sweep.plan(BASE, {"lr": [-1]}, [0])


def test_batches_split_on_program_fields_only():
  runs = sweep.plan(BASE, {"lr": [0.05, 0.1], "exit_loss_weight": [0.5, 1.0],
                           "momentum": [0.0, 0.9]}, [0, 1])
  assert len(runs) == 16 and {r.batch for r in runs} == {0}
  runs = sweep.plan(BASE, {"width": [0.125, 0.25], "lr": [0.05, 0.1]}, [0, 1])
  assert [r.batch for r in runs] == [0] * 4 + [1] * 4          # runs of a batch together
  assert {r.cfg.width for r in runs if r.batch == 1} == {0.25}
  assert runs[0].name == "width=0.125,lr=0.05/seed0" and runs[0].cfg.seed == 0


def _records(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _strip(rec):
  return {k: v for k, v in rec.items() if k not in ("seconds", "images_per_s")}


@pytest.mark.long
def test_sweep_compiles_once_per_batch_equals_solo_runs_and_resumes_exactly(tmp_path, capsys):
  strategies.clear_program_cache()
  out = tmp_path / "sw"
  grid = {"lr": [0.05, 0.1], "exit_loss_weight": [1.0]}
  rows = sweep.run_sweep(BASE, grid, [0, 1], out, log=lambda s: None)
  assert len(rows) == 4
  # one batch: every run used the same compiled client step, traced once per cut
  runners = [v for k, v in strategies.algorithm._PROGRAMS.items() if k[0] == "runner"]
  assert len(runners) == 2 and all(r.num_traces == 1 for r in runners)
  # a run of the sweep equals the same config trained alone, compiled afresh
  strategies.clear_program_cache()
  solo_cfg = dataclasses.replace(BASE, lr=0.1, exit_loss_weight=1.0, seed=1,
                                 name=f"{BASE.name}/lr=0.1,exit_loss_weight=1.0/seed1")
  train_lib.train(solo_cfg, tmp_path / "solo", log=lambda s: None)
  mine = out / "lr=0.1,exit_loss_weight=1.0" / "seed1"
  assert [_strip(r) for r in _records(mine)] == [_strip(r) for r in _records(tmp_path / "solo")]
  # results: one row per run, mean ± std per grid point, a plot per swept field
  table = list(csv.DictReader(open(out / "sweep.csv")))
  assert len(table) == 4 and {r["seed"] for r in table} == {"0", "1"}
  assert {"lr", "exit_loss_weight", "mean_exit_acc", "mean_full_acc", "exit_acc_cut2",
          "full_acc_cut4", "wall_seconds"} <= set(table[0])
  row = next(r for r in rows if r["run"] == "lr=0.05,exit_loss_weight=1.0/seed0")
  other = next(r for r in rows if r["run"] == "lr=0.05,exit_loss_weight=1.0/seed1")
  mean = (row["mean_full_acc"] + other["mean_full_acc"]) / 2
  std = float(np.std([row["mean_full_acc"], other["mean_full_acc"]], ddof=1))
  md = (out / "sweep.md").read_text()
  line = next(l for l in md.splitlines() if l.startswith("| 0.05 | 1.0 | 2 |"))
  assert f"{mean:.4f} ± {std:.4f}" in line
  for field in grid:
    assert (out / f"sweep_{field}.png").stat().st_size > 1000
  # interrupted: one run lost its last round, one never started; resume finishes both exactly
  before = {n: _records(out / n) for n in ("lr=0.1,exit_loss_weight=1.0/seed0",
                                          "lr=0.1,exit_loss_weight=1.0/seed1")}
  cut_short = out / "lr=0.1,exit_loss_weight=1.0/seed0"
  (cut_short / "summary.json").unlink()
  shutil.rmtree(cut_short / "checkpoints" / "2")
  lines = (cut_short / "metrics.jsonl").read_text().splitlines()
  (cut_short / "metrics.jsonl").write_text(lines[0] + "\n")
  shutil.rmtree(out / "lr=0.1,exit_loss_weight=1.0/seed1")
  logs = []
  sweep.resume_sweep(out, log=logs.append)
  assert sum("finished before, kept" in l for l in logs) == 2
  assert any("lr=0.1,exit_loss_weight=1.0/seed0 (resumed)" in l for l in logs)
  for n, recs in before.items():   # each run equals itself trained without a break, bit for bit
    assert [_strip(r) for r in _records(out / n)] == [_strip(r) for r in recs], n
  # the CLI refuses a second sweep into the same directory, in one line
  code = cli.main(["sweep", "--config", "configs/smoke.py", "--grid", "lr=0.1,0.2",
                   "--out", str(out)])
  err = capsys.readouterr().err
  assert code == 2 and f"{out} holds a sweep; resume it with: hsee sweep --resume {out}" in err
  assert err.count("\n") == 1


def test_a_failed_run_is_recorded_and_the_others_finish(tmp_path):
  out = tmp_path / "sw"
  with pytest.raises(RunError, match=r"^1 of 2 runs failed \(lr=1e\+30/seed0\)"):
    sweep.run_sweep(dataclasses.replace(BASE, rounds=1), {"lr": [0.05, 1e30]}, [0], out,
                    log=lambda s: None)
  table = {r["run"]: r for r in csv.DictReader(open(out / "sweep.csv"))}
  assert table["lr=0.05/seed0"]["status"] == "done" and float(table["lr=0.05/seed0"]["mean_exit_acc"]) > 0
  bad = table["lr=1e+30/seed0"]
  assert bad["status"] == "failed" and "non-finite" in bad["error"] and bad["mean_exit_acc"] == ""
  md = (out / "sweep.md").read_text()
  assert "Failed, left out: lr=1e+30/seed0" in md
  assert any(l.startswith("| 0.05 | 1 |") for l in md.splitlines())
  assert not any(l.startswith("| 1e+30 |") for l in md.splitlines())


def test_distinct_points_never_share_a_run_directory():
  """Values that differ only in characters a folder name cannot hold, or in
  letter case, get a hash each; long names are cut and hashed; the rest keep
  their readable names."""
  grid = {"data_dir": ["/data/a b", "/data/a_b", "/data/ä b", "/data/ö b", "/DATA/A_B", "/data/c"]}
  names = [p[0] for p in sweep.grid_points(BASE, grid)]
  assert len({n.casefold() for n in names}) == 6
  assert names[-1] == "data_dir=_data_c"                       # no collision: readable
  assert all("~" in n and n.startswith("data_dir=_") for n in names[:5])
  assert names == [p[0] for p in sweep.grid_points(BASE, grid)]  # the same plan, the same names
  long = sweep.grid_points(BASE, {"data_dir": ["/x/" + "y" * 300]})[0][0]
  assert len(long) == sweep.NAME_LIMIT and "~" in long
  plain = sweep.plan(BASE, {"lr": [0.05, 0.1]}, [0])
  assert [r.name for r in plain] == ["lr=0.05/seed0", "lr=0.1/seed0"]


def test_a_sweep_directory_in_use_is_refused_whole(tmp_path):
  """While a sweep holds its directory, a second one, --overwrite or
  --resume included, stops at once in one line and writes nothing."""
  out = tmp_path / "sw"
  with sweep.locked(out):
    for kw in ({}, {"overwrite": True}):
      with pytest.raises(RunError, match=f"{out} is in use by hsee process"):
        sweep.run_sweep(BASE, {"lr": [0.05]}, [0], out, log=lambda s: None, **kw)
    (out / sweep.PLAN).write_text(json.dumps({"config": BASE.to_dict(), "grid": {"lr": [0.05]},
                                              "seeds": [0]}))
    with pytest.raises(RunError, match="is in use by"):
      sweep.resume_sweep(out, log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == [".hsee.lock", sweep.PLAN]


def test_a_point_that_cannot_start_is_named_and_the_others_are_written(tmp_path, monkeypatch):
  """Missing data for one point: the sweep goes on, writes sweep.csv and
  sweep.md for the finished runs and names the failed one with its error."""
  monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)
  out = tmp_path / "sw"
  base = dataclasses.replace(BASE, rounds=1, data_dir=str(tmp_path / "nothing"))
  with pytest.raises(RunError, match=r"1 of 2 runs failed \(dataset=cifar100/seed0\)"):
    sweep.run_sweep(base, {"dataset": ["synthetic", "cifar100"]}, [0], out, log=lambda s: None)
  table = {r["run"]: r for r in csv.DictReader(open(out / "sweep.csv"))}
  assert table["dataset=synthetic/seed0"]["status"] == "done"
  bad = table["dataset=cifar100/seed0"]
  assert bad["status"] == "failed" and "cifar100" in bad["error"] and "no files" in bad["error"]
  assert "Failed, left out: dataset=cifar100/seed0" in (out / "sweep.md").read_text()


def test_results_written_whole_or_one_line(tmp_path):
  """A write of the sweep's tables that fails (here: sweep.md is a folder;
  a full disk is the same) is one line; what was written is whole."""
  from hsee_jax import rundir
  rows = [{"run": f"lr=0.1/seed{s}", "lr": 0.1, "seed": s, "batch": 0, "status": "done",
           "mean_exit_acc": 0.3 + s / 100, "mean_full_acc": 0.4} for s in (0, 1)]
  (tmp_path / "sweep.md").mkdir()
  with pytest.raises(rundir.RunError, match=r"^cannot write .*sweep\.md: Is a directory$"):
    sweep.write_results(tmp_path, {"lr": [0.1]}, rows)
  table = list(csv.DictReader(open(tmp_path / "sweep.csv")))
  assert [r["run"] for r in table] == ["lr=0.1/seed0", "lr=0.1/seed1"]
  assert not list(tmp_path.glob("*.tmp"))
