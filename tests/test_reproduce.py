"""The experiment grid runner, end to end on a tiny image-folder archive the test writes."""
import csv
import json
import sys
from pathlib import Path

import pytest

from conftest import write_image_zip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import reproduce  # noqa: E402


def test_grid_runner_on_tiny_image_folder(tmp_path, monkeypatch):
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
  code = reproduce.main(["--scale", "cpu", "--out", str(out), "--datasets",
                         "imagefolder,cifar100,stl10", "--data-dir", f"imagefolder={data}",
                         "--data-dir", f"cifar100={tmp_path / 'none'}", "--data-dir",
                         f"stl10={broken}",
                         "--set", "rounds=1", "--set", "batch_size=8", "--set", "local_steps=1",
                         "--set", "train_subset=0", "--set", "eval_batch_size=12",
                         "--seeds", "0,1"])
  assert code == 0
  rows = list(csv.DictReader(open(out / "results.csv")))
  runs = {r["run"] for r in rows}
  assert runs == set(reproduce.RUNS)
  # one row per run and cut
  assert len(rows) == sum(len(set(f["cuts"])) for f in reproduce.RUNS.values())
  for r in rows:
    assert r["dataset"] == "imagefolder" and 0.0 <= float(r["exit_accuracy"]) <= 1.0
    assert int(r["rounds"]) == 1 and float(r["simulated_seconds"]) > 0 and r["seeds"] == "2"
  # every run trained once per seed, in its own run directory; the table is their mean ± std
  def final_exit(run, seed, cut_index):
    summ = json.loads((out / "imagefolder" / run / f"seed{seed}" / "summary.json").read_text())
    assert summ["config"]["seed"] == seed
    return summ["test"]["cuts"][cut_index]["exit_acc"]["mean"]
  avg = [r for r in rows if r["run"] == "hsee-averaging"]
  pair = [final_exit("hsee-averaging", s, 0) for s in (0, 1)]
  assert float(avg[0]["exit_accuracy"]) == pytest.approx(sum(pair) / 2, abs=1e-4)
  assert float(avg[0]["exit_accuracy_std"]) == pytest.approx(
      abs(pair[0] - pair[1]) / 2 ** 0.5, abs=1e-4)
  seq = [r for r in rows if r["run"] == "hsee-sequential"]
  assert [int(r["cut"]) for r in seq] == [3, 5, 7]
  md = (out / "results.md").read_text()
  assert "cifar100 skipped: dataset cifar100: no files found" in md
  assert "stl10 skipped: dataset stl10: " in md and "is truncated or damaged" in md
  assert "### Cost per cut layer" in md and "mean ± sample standard deviation over the 2 seeds" in md
  assert " ± " in next(l for l in md.splitlines() if l.startswith("| hsee-averaging |"))
  assert "### Device budgets → cuts" in md and "### Simulated wall clock" in md
  for png in ("exit_accuracy", "accuracy_vs_round", "accuracy_vs_simulated", "early_exit"):
    assert (out / f"imagefolder_{png}.png").stat().st_size > 1000
  summary = json.loads((out / "results.json").read_text())
  assert "cifar100" in summary["skipped"]
