"""hsee_jax.tune.trainable under Ray Tune's own API (long): PBT's exploit
begins a trial's run again from a better trial's state with its own
perturbed learning rate, and examples/tune_search.py runs a search."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = """from hsee_jax.config import Config
def get_config():
  return Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 64, 32), width=0.0625,
                cuts=(2, 4), batch_size=8, local_steps=4, rounds=4, augment=False,
                mode="loop", eval_every=1, checkpoint_every=1, eval_batch_size=32)
"""
PBT = """import json, sys
from pathlib import Path
import ray
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from hsee_jax import load_config
from hsee_jax.tune import trainable
cfg, out = load_config(sys.argv[1], []), Path(sys.argv[2])
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
pbt = PopulationBasedTraining(time_attr="round", perturbation_interval=1, synch=True,
                              quantile_fraction=0.5, resample_probability=0.0,
                              hyperparam_mutations={"lr": [0.05, 0.1, 0.2]})
tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                   param_space={"hsee": cfg.to_dict(), "runs": str(out / "runs"),
                                "lr": tune.grid_search([0.1, 1e-6])},
                   tune_config=tune.TuneConfig(scheduler=pbt, metric="mean_full_acc", mode="max"),
                   run_config=tune.RunConfig(storage_path=str(out), name="pbt", verbose=0))
print("RESULTS", json.dumps([{"trial": Path(r.path).name, "lr": r.config["lr"],
                              "error": str(r.error) if r.error else None} for r in tuner.fit()]))
"""


def _env(tmp_path):
  # RAY_ADDRESS=local: a Ray of the test's own, even where another test's cluster runs here
  return {**os.environ, "RAY_ADDRESS": "local", "RAY_AIR_NEW_OUTPUT": "0", "PYTHONUNBUFFERED": "1",
          # a trial restarted by PBT reads its programs from disk instead of compiling again
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _records(run):
  return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
          for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.long
def test_pbt_begins_a_trial_again_from_a_better_trials_state(tmp_path):
  """Learning rates 0.1 and 1e-6 under synchronous PBT (every round): the
  1e-6 trial is cloned from the 0.1 one. Every trial ends with a finished run
  directory under OUT/runs/<trial>; a run that was begun again from another
  holds that run's records up to the round it was cloned after, and its
  config.json has its own perturbed learning rate, not 1e-6."""
  (tmp_path / "cfg.py").write_text(CONFIG)
  (tmp_path / "pbt.py").write_text(PBT)
  p = subprocess.run([sys.executable, str(tmp_path / "pbt.py"), str(tmp_path / "cfg.py"),
                      str(tmp_path / "out")], cwd=REPO, env=_env(tmp_path), capture_output=True,
                     text=True, timeout=1800)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  results = json.loads(p.stdout.split("RESULTS ", 1)[1].splitlines()[0])
  assert len(results) == 2 and not any(r["error"] for r in results), results
  assert "[Exploit] Cloning trial" in p.stdout + p.stderr
  runs = tmp_path / "out" / "runs"
  begun = []
  for r in results:
    run = runs / r["trial"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 4 and [x["round"] for x in _records(run)] == [0, 1, 2, 3]
    assert json.loads((run / "config.json").read_text())["lr"] == r["lr"]
    if summary["resumed_from_round"]:
      begun.append((run, summary["resumed_from_round"]))
  assert begun, "no trial was begun again from another"
  for run, start in begun:
    assert json.loads((run / "config.json").read_text())["lr"] in (0.05, 0.1, 0.2)
    sources = [runs / r["trial"] for r in results if runs / r["trial"] != run]
    assert _records(run)[0] in [_records(s)[0] for s in sources]


@pytest.mark.long
def test_the_tune_search_example_finds_its_best_run(tmp_path):
  (tmp_path / "cfg.py").write_text(CONFIG.replace("rounds=4", "rounds=2"))
  p = subprocess.run([sys.executable, "examples/tune_search.py", "--config",
                      str(tmp_path / "cfg.py"), "--samples", "2", "--out", str(tmp_path / "tune")],
                     cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  best = [l for l in p.stdout.splitlines() if l.startswith("best: ")]
  assert best and "its run: " in best[0], p.stdout[-2000:]
  run = Path(best[0].split("its run: ")[1])
  assert json.loads((run / "summary.json").read_text())["rounds"] == 2
  assert len(list((tmp_path / "tune" / "runs").iterdir())) == 2
