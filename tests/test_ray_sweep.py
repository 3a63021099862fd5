"""A sweep's runs as Ray tasks (hsee_jax.ray_sweep): each run's share of the
machine, the one-line error without Ray, and, with a real local Ray of 2
workers of 1 CPU each (long), the same metrics as the sequential sweep, a
worker killed mid-run and retried, the driver stopped by SIGTERM and resumed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hsee_jax import cli, ray_sweep
from hsee_jax.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("seconds", "images_per_s")
CONFIG = """from hsee_jax.config import Config
def get_config():
  return Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 64, 32), width=0.0625,
                cuts=(2, 4), batch_size=8, local_steps=2, rounds=ROUNDS, augment=False,
                mode="loop", eval_every=ROUNDS, checkpoint_every=1, eval_batch_size=32)
"""


def _config(tmp_path, rounds):
  path = tmp_path / f"cfg{rounds}.py"
  path.write_text(CONFIG.replace("ROUNDS", str(rounds)))
  return path


def _records(run):
  return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
          for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_each_run_gets_its_share_of_the_machine():
  cpu = ray_sweep.task_resources({"CPU": 8.0}, ray_sweep.Placement(4))
  assert cpu == ({"num_cpus": 2}, {})
  one, env = ray_sweep.task_resources({"CPU": 2.0}, ray_sweep.Placement(2))
  assert one == {"num_cpus": 1} and "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
  assert ray_sweep.task_resources({"CPU": 16.0, "GPU": 8.0}, ray_sweep.Placement(8)) == \
      ({"num_cpus": 1, "num_gpus": 1.0}, {})
  assert ray_sweep.task_resources({"CPU": 16.0, "GPU": 1.0}, ray_sweep.Placement(4, None, 0.25)) \
      == ({"num_cpus": 1, "num_gpus": 0.25}, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225"})
  assert ray_sweep.task_resources({"CPU": 96.0, "TPU": 8.0}, ray_sweep.Placement(2)) == \
      ({"num_cpus": 1, "resources": {"TPU": 4}}, {})
  with pytest.raises(ConfigError, match="--gpus-per-run: the Ray cluster has no GPU"):
    ray_sweep.task_resources({"CPU": 2.0}, ray_sweep.Placement(2, None, 0.5))
  for bad, msg in [(dict(workers=0), "--workers 0: give 1 or more"),
                   (dict(workers=2, gpus_per_run=0.0), "--gpus-per-run 0.0")]:
    with pytest.raises(ConfigError, match=msg):
      ray_sweep.Placement(**bad)


def test_workers_without_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "ray", None)   # import ray raises ImportError
  out = tmp_path / "sweep"
  code = cli.main(["sweep", "--config", str(_config(tmp_path, 2)), "--workers", "2",
                   "--out", str(out)])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "pip install -e '.[ray]'" in err, err
  assert not out.exists()


def _wait_for(predicate, timeout, what):
  t0 = time.time()
  while not predicate():
    if time.time() - t0 > timeout:
      raise AssertionError(f"waited {timeout} s for {what}")
    time.sleep(0.2)


def _sweep(args, env=None, **kw):
  return subprocess.Popen([sys.executable, "-m", "hsee_jax", "sweep", *args], cwd=REPO,
                          env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.long
def test_two_workers_give_the_sequential_sweeps_metrics_and_retry_a_lost_worker(tmp_path):
  """`--workers 2` on a real local Ray (2 CPUs, a worker each): seed 0's
  worker is SIGKILLed after its second checkpoint; Ray runs the task again,
  which resumes the run. Every run's records equal the sequential sweep's
  (bit for bit here: the same XLA threading of a 1-core share gives the
  same floats on this machine); the driver wrote the tables once."""
  cfg = _config(tmp_path, 4)
  ray_out, seq_out = tmp_path / "ray", tmp_path / "seq"
  p = _sweep(["--config", str(cfg), "--seeds", "0,1", "--workers", "2", "--out", str(ray_out)])
  log = ray_out / "logs" / "base_seed0.log"
  _wait_for(lambda: log.exists() and (ray_out / "base" / "seed0" / "metrics.jsonl").exists()
            and len((ray_out / "base" / "seed0" / "metrics.jsonl").read_text().splitlines()) >= 2,
            300, "seed 0's second round")
  pid = int(log.read_text().split("[ray] attempt 1: process ")[1].split()[0])
  os.kill(pid, signal.SIGKILL)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert "[ray] attempt 2" in log.read_text()
  assert "base/seed0 done" in out and "its worker was lost; run again 1 time" in out, out
  assert "about" in out and "elapsed" in out
  assert cli.main(["sweep", "--config", str(cfg), "--seeds", "0,1", "--out", str(seq_out)]) == 0
  for seed in (0, 1):
    assert _records(ray_out / "base" / f"seed{seed}") == _records(seq_out / "base" / f"seed{seed}")
  rows = (ray_out / "sweep.csv").read_text().splitlines()
  assert len(rows) == 3 and all(",done," in r for r in rows[1:]), rows
  assert any((ray_out / "compile_cache").iterdir())   # the workers' shared compilation cache


@pytest.mark.long
def test_a_killed_driver_and_a_stopped_one_resume_to_the_straight_sweep(tmp_path):
  """The driver SIGKILLed mid-sweep: Ray ends its workers with it, and
  `hsee sweep --resume DIR --workers 2` goes on; that driver stopped by
  SIGTERM: 143, one line naming the sweep to resume, no process of it left;
  a last resume finishes. Every run's records equal the straight sweep's."""
  cfg = _config(tmp_path, 6)
  out, straight = tmp_path / "ray", tmp_path / "straight"
  records = lambda seed: out / "base" / f"seed{seed}" / "metrics.jsonl"
  p = _sweep(["--config", str(cfg), "--seeds", "0,1", "--workers", "2", "--out", str(out)],
             start_new_session=True)
  _wait_for(lambda: records(0).exists(), 300, "seed 0's first round")
  p.kill()
  p.communicate(timeout=60)
  _wait_for(lambda: not subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True,
                                       text=True).stdout.strip(), 120, "the killed sweep's workers")
  log = out / "logs" / "base_seed0.log"
  before = log.stat().st_size
  r = _sweep(["--resume", str(out), "--workers", "2"], start_new_session=True)
  _wait_for(lambda: "round " in log.read_text()[before:], 300, "a round of the resumed sweep")
  r.send_signal(signal.SIGTERM)
  text, _ = r.communicate(timeout=600)
  assert r.returncode == 143, text
  last = text.rstrip().splitlines()[-1]
  assert last.startswith("hsee: SIGTERM: stopped the ") and f"hsee sweep --resume {out}" in last
  time.sleep(2)
  left = subprocess.run(["pgrep", "-s", str(r.pid)], capture_output=True, text=True).stdout
  assert not left.strip(), left
  assert not (out / "base" / "seed0" / "summary.json").exists()
  r = _sweep(["--resume", str(out), "--workers", "2"])
  text, _ = r.communicate(timeout=600)
  assert r.returncode == 0, text
  assert cli.main(["sweep", "--config", str(cfg), "--seeds", "0,1", "--out", str(straight)]) == 0
  for seed in (0, 1):
    assert _records(out / "base" / f"seed{seed}") == _records(straight / "base" / f"seed{seed}")


@pytest.mark.long
def test_asha_stops_the_runs_that_cannot_learn_and_the_tables_mark_them(tmp_path):
  """`--stop-early asha` (Ray Tune's ASHA, rungs at every evaluation): of
  learning rates 0.1, 1e-6 and 2e-6 (one trial at a time, in grid order),
  the two that cannot learn are stopped at the first rung, after round 1;
  the other runs to the end. The tables mark the stopped runs and their
  last round, and leave them out of the means."""
  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG.replace("ROUNDS", "4").replace("eval_every=4", "eval_every=1")
                 .replace("local_steps=2", "local_steps=4"))
  out = tmp_path / "asha"
  p = _sweep(["--config", str(cfg), "--grid", "lr=0.1,1e-6,2e-6", "--workers", "1",
              "--stop-early", "asha", "--out", str(out)])
  text, _ = p.communicate(timeout=900)
  assert p.returncode == 0, text
  stopped = json.loads((out / "stopped_early.json").read_text())
  assert stopped == {"lr=1e-06/seed0": 1, "lr=2e-06/seed0": 1}, (stopped, text)
  assert (out / "lr=0.1" / "seed0" / "summary.json").exists()
  rows = (out / "sweep.csv").read_text().splitlines()
  assert sum(",stopped early," in r for r in rows) == 2 and sum(",done," in r for r in rows) == 1
  assert "Stopped early by ASHA, left out: lr=1e-06/seed0 (after round 1)" in \
      (out / "sweep.md").read_text()
  assert text.count("ended after round") == 3, text
  # a stopped run is an ordinary run directory: its records up to the round it was stopped at
  records = _records(out / "lr=1e-06" / "seed0")
  assert [r["round"] for r in records if "train" in r] == [0]


def test_stop_early_needs_ray_workers(tmp_path, capsys):
  code = cli.main(["sweep", "--config", str(_config(tmp_path, 2)), "--stop-early", "asha",
                   "--out", str(tmp_path / "s")])
  assert code == 2 and "--stop-early: runs on Ray; give --workers N" in capsys.readouterr().err



def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.long
def test_a_sweep_runs_on_a_ray_cluster_at_its_address(tmp_path):
  """A cluster started apart (`ray start --head`, with the token
  authentication Ray sets up: RAY_AUTH_MODE=token and a token file) and
  `hsee sweep --ray-address ADDR --workers 2` run from the same
  environment: the runs are tasks of that cluster, the sweep finishes with
  the sequential sweep's records, and the cluster is left running for its
  owner."""
  import uuid
  token = tmp_path / "auth_token"
  token.write_text(uuid.uuid4().hex)
  env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
  port = _free_port()
  ray_cli = str(Path(sys.executable).with_name("ray"))
  # its own temporary folder: no other test's Ray finds (and joins) this cluster
  temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
  head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                           "--include-dashboard=false", f"--temp-dir={temp}"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    address = f"127.0.0.1:{port}"
    _wait_for(lambda: subprocess.run([ray_cli, "status", "--address", address], env=env,
                                     capture_output=True).returncode == 0, 120, "the Ray head")
    cfg, out, seq = _config(tmp_path, 2), tmp_path / "ray", tmp_path / "seq"
    p = _sweep(["--config", str(cfg), "--seeds", "0,1", "--ray-address", address, "--workers",
                "2", "--out", str(out)], env={**env, "PYTHONUNBUFFERED": "1"})
    text, _ = p.communicate(timeout=600)
    assert p.returncode == 0, text
    assert f"Ray at {address}" in text, text
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:]), rows
    assert subprocess.run([ray_cli, "status", "--address", address], env=env,
                          capture_output=True).returncode == 0   # still running
    assert cli.main(["sweep", "--config", str(cfg), "--seeds", "0,1", "--out", str(seq)]) == 0
    for seed in (0, 1):
      assert _records(out / "base" / f"seed{seed}") == _records(seq / "base" / f"seed{seed}")
  finally:
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=120)
    shutil.rmtree(temp, ignore_errors=True)
