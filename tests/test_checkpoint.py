"""Checkpoints survive: SIGKILL and resume gives the straight run bit for bit."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from hsee_jax import config as config_lib
from hsee_jax import rundir
from hsee_jax import train as train_lib
from hsee_jax.checkpoint import Checkpointer
from hsee_jax.config import Config

REPO = Path(__file__).resolve().parents[1]
CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 40), width=0.125,
             cuts=(2, 6, 6), batch_size=8, local_steps=3, rounds=4, eval_every=1,
             eval_batch_size=20, exit_thresholds=(0.0, 0.5, 1.0), checkpoint_every=1,
             keep_checkpoints=5)


def _cli(*args, env_extra=None, wait=True):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
  cmd = [sys.executable, "-m", "hsee_jax", *args]
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  if wait:
    out, _ = p.communicate(timeout=600)
    return p.returncode, out
  return p


def _config_file(tmp_path, cfg):
  path = tmp_path / "cfg.py"
  fields = ", ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()).replace("[", "(").replace("]", ")")
  path.write_text(f"from hsee_jax.config import Config\ndef get_config():\n  return Config({fields})\n")
  return path


def _records(run):
  return [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "images_per_s")}
          for l in (run / "metrics.jsonl").read_text().splitlines()]


def _final_state(run, cfg):
  _, strategy = train_lib.build(cfg)
  with Checkpointer(run / "checkpoints", create=False) as ck:
    state, meta = rundir.restore_state(strategy.abstract_state(), ck, cfg)
  return state, meta


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run, trained in this process (the interrupted ones run
  as real processes and are resumed here, with the same compiled programs)."""
  tmp = tmp_path_factory.mktemp("straight")
  train_lib.train(CFG, tmp / "run", log=lambda s: None)
  return tmp / "run"


def _resume_here(run) -> str:
  logs = []
  train_lib.train(CFG, run, resume=True, log=logs.append)
  return "\n".join(logs)


def _wait_for_step(run, step, proc, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if (run / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists():
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  raise TimeoutError(f"no checkpoint {step}")


@pytest.mark.long
def test_sigkill_then_resume_is_bitwise_identical(straight, tmp_path):
  run = tmp_path / "run"
  proc = _cli("train", "--config", str(_config_file(tmp_path, CFG)), "--out", str(run), wait=False)
  _wait_for_step(run, 2, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  done = Checkpointer(run / "checkpoints", create=False)
  assert 2 <= done.latest_step() < 4
  done.close()
  out = _resume_here(run)
  assert "resuming" in out
  assert _records(run) == _records(straight)
  a, meta_a = _final_state(run, CFG)
  b, meta_b = _final_state(straight, CFG)
  assert meta_a["round"] == meta_b["round"] == 4
  chex.assert_trees_all_equal(a, b)  # bitwise on CPU
  summary = json.loads((run / "summary.json").read_text())
  assert summary["test"] == json.loads((straight / "summary.json").read_text())["test"]


@pytest.mark.long
def test_kill_during_checkpoint_write_falls_back_to_previous(straight, tmp_path):
  run = tmp_path / "run"
  code, out = _cli("train", "--config", str(_config_file(tmp_path, CFG)), "--out", str(run),
                   env_extra={"HSEE_FAULT_KILL_DURING_SAVE": "3"})
  assert code == -signal.SIGKILL, out
  ck = Checkpointer(run / "checkpoints", create=False)
  steps = ck.steps()
  ck.close()
  assert steps[-1] in (2, 3)
  if steps[-1] == 3:  # the write won the race with the kill: make step 3 half-written by hand
    shutil.rmtree(run / "checkpoints" / "3")
    shutil.copytree(run / "checkpoints" / "2", run / "checkpoints" / "3.orbax-checkpoint-tmp")
  out = _resume_here(run)
  assert "from checkpoint after round 2" in out
  assert _records(run) == _records(straight)
  chex.assert_trees_all_equal(_final_state(run, CFG)[0], _final_state(straight, CFG)[0])


def test_resume_refuses_other_config_and_missing_checkpoint(straight, tmp_path, capsys):
  code, out = _cli("train", "--resume", str(straight), "--set", "width=0.25", "--set", "lr=0.1")
  assert code == 2
  assert "different config: lr: checkpoint 0.05, now 0.1; width: checkpoint 0.125, now 0.25" in out
  code, out = _cli("train", "--resume", str(tmp_path / "nothing"))
  assert code == 2 and "holds no run" in out
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  shutil.copy(straight / "config.json", empty / "config.json")
  code, out = _cli("train", "--resume", str(empty))
  assert code == 2 and "no complete checkpoint" in out
  code, out = _cli("train", "--config", str(_config_file(tmp_path, CFG)), "--out", str(straight))
  assert code == 2 and "already holds a run" in out


def test_eval_from_checkpoint(straight):
  code, out = _cli("eval", "--run", str(straight), "--round", "3")
  assert code == 0, out
  result = json.loads((straight / "eval_round3.json").read_text())
  # the round-3 checkpoint evaluates to what training recorded after round 3
  recorded = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()][2]
  assert result["test"] == recorded["test"]
  assert "early exit" in out
  code, out = _cli("eval", "--run", str(straight), "--round", "9")
  assert code == 2 and "no checkpoint after round 9" in out


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path):
  # lr explodes only late: the schedule makes round 3 diverge after good rounds 1-2
  cfg = config_lib.override(CFG, ["schedule=step", "step_milestones=(0.5,)", "step_gamma=1e32",
                                  "momentum=0.0"])
  with pytest.raises(train_lib.RunError, match=r"round \d: non-finite .* last good checkpoint: after round \d"):
    train_lib.train(cfg, tmp_path, log=lambda s: None)
  with Checkpointer(tmp_path / "checkpoints", create=False) as ck:
    last = ck.latest_step()
  assert last is not None and last >= 2
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert recs[-1]["event"] == "stopped" and recs[-1]["round"] == last
  # the kept checkpoint is finite
  _, strategy = train_lib.build(cfg)
  with Checkpointer(tmp_path / "checkpoints", create=False) as ck:
    state, _ = rundir.restore_state(strategy.abstract_state(), ck, cfg)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_a_checkpoint_from_before_a_new_empty_field_restores(tmp_path):
  """A state saved before its dataclass gained a field that is empty by
  default (``AveragingState.server_units``, say) restores, the new field
  taken from the template; a missing field that holds arrays stays an error."""
  from hsee_jax.checkpoint import CheckpointError
  from hsee_jax.optim import PartState
  from hsee_jax.strategies import AveragingState
  empty = PartState({}, {}, {})
  unit = {"unit_1": {"w": np.arange(3, dtype=np.float32)}}
  old = {"model": PartState(unit, {}, {}), "exit_heads": {}, "clients": {}, "tier_units": {}}
  with Checkpointer(tmp_path / "ckpt", asynchronous=False) as ckpt:
    ckpt.save(1, old, {"round": 1})
    ckpt.finish(1)
  template = AveragingState(model=PartState(unit, {}, {}), exit_heads={}, clients={})
  with Checkpointer(tmp_path / "ckpt", create=False) as ckpt:
    got = ckpt.restore_state(template, 1)
    assert isinstance(got, AveragingState) and got.server_units == empty
    np.testing.assert_array_equal(got.model.params["unit_1"]["w"], [0, 1, 2])
    with pytest.raises(CheckpointError, match=r"^checkpoint after round 1 could not be restored"):
      ckpt.restore_state(template.replace(server_units=PartState(unit, {}, {})), 1)
