"""Several processes as one JAX job (jax.distributed), with real processes on
this machine: 2 processes x 2 CPU devices joined over gloo against 1 process
with 4 devices; SIGKILL of every process and --resume; a sweep over
the two processes; an unreachable coordinator. Every process a test starts
is ended by it."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hsee_jax import distributed, rundir

pytestmark = pytest.mark.long  # run by .ci/run after the default run

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config", str(REPO / "configs" / "smoke.py"), "--set", "dataset=synthetic",
        "--set", "synthetic_shape=(16,16,4,128,32)", "--set", "cuts=(3,3,6,6)",
        "--set", "shard_clients=True", "--set", "mode=vmap", "--set", "client_chunk=4",
        "--set", "rounds=2", "--set", "local_steps=2", "--set", "batch_size=8"]




def _hsee(*args) -> list[str]:
  return [sys.executable, "-m", "hsee_jax", *args]


def _launch(args, out: Path, logs: Path, n: int = 2) -> list[subprocess.Popen]:
  port = distributed.free_port()
  procs = []
  for i in range(n):
    log = open(logs / f"process{i}.log", "w")
    procs.append(subprocess.Popen(
        _hsee(*args, "--distributed", "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", str(n), "--process-id", str(i), "--distributed-timeout", "60"),
        env=distributed.cpu_env(2), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, logs: Path, timeout: float = 400) -> None:
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    _end(procs)
  texts = [(logs / f"process{i}.log").read_text() for i in range(len(procs))]
  assert all(p.returncode == 0 for p in procs), "\n".join(t[-3000:] for t in texts)


def _end(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _records(run: Path) -> list[dict]:
  return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _wait_for_round_1(procs, out: Path, logs: Path) -> float:
  """Until round 1 is recorded (the processes are in round 2); returns the deadline."""
  deadline = time.time() + 400
  while not ((out / "metrics.jsonl").exists() and _records(out)):
    assert time.time() < deadline and all(p.poll() is None for p in procs), \
        (logs / "process0.log").read_text()[-3000:]
    time.sleep(0.2)
  return deadline


def _outcome(procs, logs: Path, timeout: float) -> tuple[list[int], list[str]]:
  """Wait for every process: their exit codes and logs."""
  for p in procs:
    p.wait(timeout=timeout)
  return [p.returncode for p in procs], [(logs / f"process{i}.log").read_text()
                                         for i in range(len(procs))]


def _final_state(run: Path):
  """The state in the run's last checkpoint, read in this one-device process."""
  import dataclasses

  import jax
  from hsee_jax import train as train_lib
  from hsee_jax.checkpoint import Checkpointer
  cfg = rundir.load_config(run)
  _, sim = train_lib.build(dataclasses.replace(cfg, shard_clients=False))
  with Checkpointer(run / "checkpoints", create=False) as ck:
    return jax.tree.map(np.asarray, ck.restore_state(sim.abstract_state(), cfg.rounds))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """Averaging, 4 clients, 2 rounds, as 2 processes x 2 CPU devices."""
  base = tmp_path_factory.mktemp("distributed")
  out = base / "run"
  _wait(_launch(["train", *ARGS, "--out", str(out)], out, base), base)
  return out


def test_two_processes_equal_one_process_with_four_devices(two_process_run, tmp_path):
  """Tolerance: the same programs over the same 4-device mesh; the cross-device
  sums run over gloo between the processes and in-process on one, in another
  order (float32 sums: rtol 1e-5)."""
  one = tmp_path / "one"
  r = subprocess.run(_hsee("train", *ARGS, "--out", str(one)), env=distributed.cpu_env(4),
                     cwd=REPO, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  two = two_process_run
  # process 0 alone wrote the run's files; every process saved the checkpoints
  summary = json.loads((two / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["num_clients"] == 4
  assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
  a, b = _records(one), _records(two)
  assert [x["round"] for x in b] == [0, 1]
  for x, y in zip(a, b):
    for k in x["train"]:
      assert y["train"][k] == pytest.approx(x["train"][k], rel=1e-5, abs=1e-6)
    assert y["test"]["mean_exit_acc"] == x["test"]["mean_exit_acc"]
    assert y["test"]["mean_full_acc"] == x["test"]["mean_full_acc"]
  import jax
  for p, q in zip(jax.tree.leaves(_final_state(one)), jax.tree.leaves(_final_state(two))):
    np.testing.assert_allclose(q, p, rtol=1e-5, atol=1e-6)


def test_every_process_killed_then_resumed_ends_as_the_straight_run(two_process_run, tmp_path):
  """SIGKILL both processes once the checkpoint after round 1 is complete;
  relaunched with --resume, they end where the straight run ended."""
  out = tmp_path / "run"
  procs = _launch(["train", *ARGS, "--set", "checkpoint_every=1", "--out", str(out)], out,
                  tmp_path)
  try:
    deadline = time.time() + 400
    # orbax renames a step's directory, then writes its metadata: complete
    while not (out / "checkpoints" / "1" / "_CHECKPOINT_METADATA").exists():
      assert time.time() < deadline and all(p.poll() is None for p in procs), \
          (tmp_path / "process0.log").read_text()[-3000:]
      time.sleep(0.2)
    for p in procs:
      p.send_signal(signal.SIGKILL)
  finally:
    _end(procs)
  assert not (out / "summary.json").exists()
  _wait(_launch(["train", "--resume", str(out)], out, tmp_path), tmp_path)
  assert "resuming" in (tmp_path / "process0.log").read_text()
  straight, resumed = _records(two_process_run), _records(out)
  assert [r["round"] for r in resumed] == [0, 1]
  assert resumed[-1]["train"] == pytest.approx(straight[-1]["train"], rel=1e-6)
  assert resumed[-1]["test"] == straight[-1]["test"]


def test_resume_where_process_0_sets_checkpoints_aside(two_process_run, tmp_path):
  """A finished run whose records were lost (killed before round 1's record):
  relaunched with --resume, process 0 sets the checkpoint after round 2 aside
  and both processes train again from round 1; every process sees the
  checkpoint gone before saving round 2 again, and the run ends as the
  straight run."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(two_process_run, out)
  (out / "metrics.jsonl").write_text("")
  (out / "summary.json").unlink()
  _wait(_launch(["train", "--resume", str(out)], out, tmp_path), tmp_path)
  assert "training again from round 1" in (tmp_path / "process0.log").read_text()
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "2.unrecorded"]
  straight, resumed = _records(two_process_run), _records(out)
  assert [r["round"] for r in resumed] == [0, 1]
  assert resumed[-1]["train"] == pytest.approx(straight[-1]["train"], rel=1e-6)
  assert resumed[-1]["test"] == straight[-1]["test"]


def test_one_process_failing_alone_stops_both_with_one_line_each(tmp_path):
  """The save after round 1 fails on process 1 only (a full disk on one
  host): process 1 ends with its one-line error, process 0 with one line
  naming process 1 and its error, both with exit code 2; neither is left
  waiting for the other until JAX's timeouts abort it."""
  out = tmp_path / "run"
  port = distributed.free_port()
  procs = []
  for i in range(2):
    env = distributed.cpu_env(2)
    if i == 1:
      env["HSEE_FAULT_FAIL_SAVE"] = "1"
    procs.append(subprocess.Popen(
        _hsee("train", *ARGS, "--set", "checkpoint_every=1", "--out", str(out), "--distributed",
              "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
              str(i), "--distributed-timeout", "60"),
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    errs = [p.communicate(timeout=400)[1] for p in procs]
  finally:
    _end(procs)
  assert [p.returncode for p in procs] == [2, 1], errs    # 1: the refused write; 2: stopped by it
  cause = "saving the checkpoint after round 1 failed: OSError: [Errno 28] No space left"
  last = [e.strip().splitlines()[-1] for e in errs]
  assert last[1].startswith(f"hsee: error: {out}: round 1: {cause}"), errs[1]
  assert last[0].startswith(f"hsee: error: process 1 failed, so process 0 stops: {out}: "
                            f"round 1: {cause}"), errs[0]
  for e in errs:
    assert "Terminating process" not in e and "Traceback" not in e and \
        e.count("hsee: error:") == 1, e


def test_a_stop_signal_to_one_process_stops_both_after_the_same_round(tmp_path):
  """SIGINT to process 1 alone (a Ctrl-C in one host's terminal): at the next
  round boundary both processes agree to stop, save the same checkpoint
  together and exit 130 with the resume hint, instead of process 1 saving
  alone while process 0 goes on into a collective that never completes."""
  out = tmp_path / "run"
  procs = _launch(["train", *ARGS, "--set", "rounds=6", "--set", "checkpoint_every=3",
                   "--out", str(out)], out, tmp_path)
  try:
    _wait_for_round_1(procs, out, tmp_path)
    procs[1].send_signal(signal.SIGINT)
    codes, logs = _outcome(procs, tmp_path, 300)
  finally:
    _end(procs)
  assert codes == [130, 130], "\n".join(t[-3000:] for t in logs)
  stop = [r for r in _records(out) if r.get("event") == "stopped"]
  assert len(stop) == 1, _records(out)
  rnd = stop[0]["round"]
  assert 1 <= rnd < 6  # stopped early, after a whole round
  hint = f"hsee: SIGINT: stopped after round {rnd}; resume with: hsee train --resume {out}"
  for text in logs:
    assert text.strip().splitlines()[-1] == hint, text[-2000:]
    assert "Traceback" not in text and "Terminating process" not in text
  assert (out / "checkpoints" / str(rnd) / "_CHECKPOINT_METADATA").exists()


def test_a_second_signal_to_one_process_ends_both_at_once(tmp_path):
  """Two SIGINTs to process 1 alone: it stops at once with its one line
  (130), and process 0, which got none, ends with one line naming it (2),
  instead of waiting in a collective for a process that is gone."""
  out = tmp_path / "run"
  procs = _launch(["train", *ARGS, "--set", "rounds=6", "--out", str(out)], out, tmp_path)
  try:
    deadline = _wait_for_round_1(procs, out, tmp_path)  # now in round 2
    procs[1].send_signal(signal.SIGINT)
    # the second once the first was handled (Python handles signals that
    # arrive during one call into XLA once): process 1 says so
    while "stopping after the round in flight" not in (tmp_path / "process1.log").read_text():
      assert time.time() < deadline and procs[1].poll() is None
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGINT)
    codes, logs = _outcome(procs, tmp_path, 120)
  finally:
    _end(procs)
  assert codes == [2, 130], "\n".join(t[-3000:] for t in logs)
  line = "SIGINT: stopped at once, the round in flight is lost"
  assert logs[1].strip().splitlines()[-1] == f"hsee: {line}", logs[1][-2000:]
  assert logs[0].strip().splitlines()[-1] == \
      f"hsee: error: process 1 failed, so process 0 stops: {line}", logs[0][-2000:]
  for text in logs:
    assert "Traceback" not in text and "Terminating process" not in text


def test_sweep_over_two_processes(two_process_run, tmp_path):
  """hsee sweep --distributed: the run of the sweep equals the straight run
  over the two processes, and process 0 alone writes the sweep's tables."""
  out = tmp_path / "sweep"
  _wait(_launch(["sweep", *ARGS, "--seeds", "0", "--out", str(out)], out, tmp_path), tmp_path)
  assert "[sweep] done" in (tmp_path / "process0.log").read_text()
  assert "[sweep]" not in (tmp_path / "process1.log").read_text()
  rows = list(csv.DictReader(open(out / "sweep.csv")))
  assert [(r["seed"], r["status"]) for r in rows] == [("0", "done")]
  strip = lambda recs: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                        for r in recs]
  assert strip(_records(out / "base" / "seed0")) == strip(_records(two_process_run))


def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
  port = distributed.free_port()   # nothing listens there
  t0 = time.time()
  r = subprocess.run(_hsee("train", *ARGS, "--out", str(tmp_path / "run"), "--distributed",
                           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                           "--process-id", "1", "--distributed-timeout", "3"),
                     env=distributed.cpu_env(2), cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "could not reach the coordinator at 127.0.0.1" in lines[0], r.stderr
  assert "within 3 s" in lines[0] and time.time() - t0 < 60
  assert not (tmp_path / "run").exists()
  # the options need --distributed
  r = subprocess.run(_hsee("train", *ARGS, "--out", str(tmp_path / "run"), "--coordinator",
                           "127.0.0.1:1"), env=distributed.cpu_env(1), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "--coordinator needs --distributed" in r.stderr
