"""Long runs never lose or mix a result: the run-directory lock, failed saves,
damaged checkpoints and metrics, stop signals, extending a finished run, and
one-line errors (exit code 2) for what a user gets wrong."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest

from hsee_jax import cli, precision, preflight, rundir, stopping
from hsee_jax import config as config_lib
from hsee_jax import train as train_lib
from hsee_jax.checkpoint import Checkpointer
from hsee_jax.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]
CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 40), width=0.125,
             cuts=(2, 6), batch_size=8, local_steps=2, rounds=3, eval_batch_size=20,
             exit_thresholds=(0.0, 0.5, 1.0), checkpoint_every=1, keep_checkpoints=5,
             schedule="constant")
QUIET = dict(log=lambda s: None)


def _config_file(tmp_path, cfg, name="cfg.py"):
  path = tmp_path / name
  fields = ", ".join(f"{k}={v!r}" for k, v in cfg.to_dict().items()).replace("[", "(").replace("]", ")")
  path.write_text(f"from hsee_jax.config import Config\ndef get_config():\n  return Config({fields})\n")
  return path


def _run(*args, env_extra=None, timeout=600):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
  r = subprocess.run([sys.executable, "-m", "hsee_jax", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  return r.returncode, r.stdout, r.stderr


def _records(run):
  return [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "images_per_s")}
          for l in (run / "metrics.jsonl").read_text().splitlines()]


def _state(run, cfg, step=None):
  _, sim = train_lib.build(cfg)
  with Checkpointer(run / "checkpoints", create=False) as ck:
    return rundir.restore_state(sim.abstract_state(), ck, cfg, step, **QUIET)[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """CFG trained for 3 rounds, a checkpoint after each."""
  run = tmp_path_factory.mktemp("straight") / "run"
  train_lib.train(CFG, run, **QUIET)
  return run


def _copy(run, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(run, dst, ignore=shutil.ignore_patterns(rundir.LOCK_NAME))
  return dst


# -- the lock ---------------------------------------------------------------------------------
@pytest.mark.long
def test_busy_run_directory_and_a_preempted_process(tmp_path):
  """The issue's case: a second ``hsee train`` into the ``--out`` of a running
  one (before, both exited 0 with their files mixed) is refused in one line.
  Then the running one is pre-empted (SIGTERM) in its first rounds, before any
  periodic checkpoint: it saves what it trained, prints one line and exits
  with 143 (before: a traceback and nothing to resume)."""
  run = tmp_path / "run"
  slow = config_lib.override(CFG, ["rounds=40", "checkpoint_every=0"])
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  first = subprocess.Popen([sys.executable, "-m", "hsee_jax", "train", "--config",
                            str(_config_file(tmp_path, slow)), "--out", str(run)], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    t0 = time.time()
    while not (run / "metrics.jsonl").exists():   # written just before round 1 starts
      assert first.poll() is None and time.time() - t0 < 300
      time.sleep(0.05)
    other = _config_file(tmp_path, config_lib.override(CFG, ["lr=0.01"]), "other.py")
    for extra in ([], ["--overwrite"]):
      code, out, err = _run("train", "--config", str(other), "--out", str(run), *extra)
      assert code == 2, out + err
      assert err.count("\n") == 1 and f"is in use by hsee process {first.pid} on" in err, err
    assert json.loads((run / "config.json").read_text())["lr"] == CFG.lr   # untouched
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
  finally:
    first.kill()
    first.wait()
  assert first.returncode == 143, out + err
  assert "Traceback" not in out + err
  done = int(re.search(r"stopped (?:after round (\d+)|before round 1);", err).group(1) or 0)
  when = f"after round {done}" if done else "before round 1"
  assert err == f"hsee: SIGTERM: stopped {when}; resume with: hsee train --resume {run}\n"
  with Checkpointer(run / "checkpoints", create=False) as ck:
    assert ck.steps() == [done]   # resumable (the in-process test resumes bit for bit)
  assert (run / rundir.LOCK_NAME).read_text() == ""   # released on the way out
  # a lock file left by a killed holder (the kernel dropped its flock) is taken over
  (run / rundir.LOCK_NAME).write_text("hsee process 4242 on elsewhere since 2026-01-01 00:00:00\n")
  lines = []
  with rundir.RunLock(run).acquire(lines.append):
    assert f"hsee process {os.getpid()} on" in (run / rundir.LOCK_NAME).read_text()
  assert any("taking over the lock left by hsee process 4242 on elsewhere" in l for l in lines), lines


# -- failed saves -----------------------------------------------------------------------------
def _unshare_works() -> bool:
  try:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def test_failed_save_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(straight, tmp_path):
  """A save that fails is caught by the end of its round; the run stops with
  one line naming the cause and the previous checkpoint intact (even with
  keep_checkpoints=1, where orbax itself would have deleted it). With a real
  full filesystem where one can be mounted (a tmpfs in a private mount
  namespace; needs root), else by fault injection."""
  cfg = config_lib.override(CFG, ["rounds=3", "keep_checkpoints=1"])
  cfg_file = _config_file(tmp_path, cfg)
  if _unshare_works():
    # size the filesystem to hold one checkpoint and the run's files, not two
    # checkpoints (the straight run trained the same network)
    used = lambda fs: sum(f.stat().st_blocks * 512 for f in fs)   # pages, as tmpfs counts
    ckpt = used((straight / "checkpoints" / "1").rglob("*"))
    files = used(f for f in straight.iterdir() if f.is_file())
    size_kb = (files * 3 + int(ckpt * 1.5)) // 1024 + 64
    mnt, report = tmp_path / "small", tmp_path / "report"
    mnt.mkdir()
    report.mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} && "
              f"{sys.executable} -m hsee_jax train --config {cfg_file} --out {mnt}/run "
              f"> {report}/out 2> {report}/err; echo $? > {report}/code; "
              f"cp -r {mnt}/run {report}/run; "
              # and an --out on a read-only filesystem: one line, before any work
              f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && "
              f"{sys.executable} -m hsee_jax train --config {cfg_file} --out {ro}/run "
              f"2> {report}/ro_err; echo $? > {report}/ro_code")
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, timeout=600,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    code, err, run = int((report / "code").read_text()), (report / "err").read_text(), report / "run"
    cause = "No space left on device"
    ro_err = (report / "ro_err").read_text()
    assert int((report / "ro_code").read_text()) == 2 and ro_err.count("\n") == 1, ro_err
    assert f"cannot use {ro}/run as a run directory: Read-only file system" in ro_err
  else:
    run = tmp_path / "run"
    code, _, err = _run("train", "--config", str(cfg_file), "--out", str(run),
                        env_extra={"HSEE_FAULT_FAIL_SAVE": "2"})
    cause = "No space left on device (fault injected"
  assert code == 1, err    # the machine refused a write: not the input's fault
  assert err.count("\n") == 1, err
  assert err.startswith("hsee: error: round 2: saving the checkpoint after round 2 failed: ")
  assert cause in err and err.strip().endswith("the newest checkpoint that restores: after round 1")
  with Checkpointer(run / "checkpoints", create=False) as ck:
    assert ck.steps() == [1]
  _state(run, cfg)  # restores
  last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["event"] == "stopped" and "saving the checkpoint after round 2 failed" in last["error"]


# -- damaged checkpoints and metrics ----------------------------------------------------------
def _largest_file(folder: Path) -> Path:
  return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.mark.long
def test_damaged_checkpoints_are_skipped_by_resume_and_eval(straight, tmp_path):
  """The newest checkpoint has a truncated array file, the one before it a
  truncated metadata file: eval and resume say so and use the newest intact
  one; naming a damaged one gives one line with the reader's own reason."""
  run = _copy(straight, tmp_path)
  f = _largest_file(run / "checkpoints" / "3" / "state")
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  (run / "checkpoints" / "2" / "meta" / "metadata").write_text('{"round": 2, "train_k')
  code, out, err = _run("eval", "--run", str(run))
  assert code == 0, out + err
  assert "skipping: checkpoint after round 3 could not be restored: orbax says" in out
  assert "skipping: checkpoint after round 2 is damaged: its metadata cannot be read" in out
  assert "using the newest intact checkpoint, after round 1" in out
  assert (run / "eval_round1.json").exists()
  code, out, err = _run("eval", "--run", str(run), "--round", "3")
  assert code == 2 and err.count("\n") == 1, err   # orbax's noise kept off the terminal
  assert "checkpoint after round 3 could not be restored: orbax says" in err
  assert "other checkpoints: after rounds [1, 2]" in err and "does not fit" not in err
  with pytest.raises(train_lib.RunError, match=r"after round 2 is damaged: its metadata cannot "
                     r"be read \(JSONDecodeError: .*\); other checkpoints: after rounds \[1, 3\]"):
    train_lib.evaluate_run(run, 2, **QUIET)
  # a damaged metrics line before the last is an error, not a silent loss
  good = (run / "metrics.jsonl").read_text().splitlines()
  (run / "metrics.jsonl").write_text(good[0] + "\n{oops\n" + good[2] + "\n")
  with pytest.raises(train_lib.RunError, match="metrics.jsonl: line 2 is not JSON"):
    train_lib.train(CFG, run, resume=True, **QUIET)
  # a half-written last line (a crash mid-write) is dropped with a note; resume
  # trains rounds 2-3 again from checkpoint 1, sets the damaged checkpoints
  # aside, and ends where the straight run ended
  (run / "metrics.jsonl").write_text("\n".join(good[:2]) + "\n" + good[2][:40])
  lines = []
  train_lib.train(CFG, run, resume=True, log=lines.append)
  assert any("dropped a half-written last line (line 3" in l for l in lines), lines
  assert any("moved the damaged checkpoint after round 2" in l for l in lines), lines
  # round 3's record is the half-written line: its checkpoint is set aside as such
  assert any("moved the unrecorded checkpoint after round 3" in l for l in lines), lines
  assert (run / "checkpoints" / "2.damaged").is_dir()
  assert (run / "checkpoints" / "3.unrecorded").is_dir()
  assert _records(run) == _records(straight)
  chex.assert_trees_all_equal(_state(run, CFG), _state(straight, CFG))


def test_checkpoint_ahead_of_its_round_record(straight, tmp_path):
  """A checkpoint is complete on disk before its round's record is written (the
  save runs beside the evaluation the record holds). A run killed between the
  two resumes from the checkpoint before, recomputing the round, and ends
  where the straight run ends (before: the round's record was missing for
  good). With no older checkpoint it trains again from round 1."""
  good = (straight / "metrics.jsonl").read_text().splitlines()
  cases = [  # (checkpoints removed, records kept, what resume says)
      ((3,), 1, ("resuming", "from checkpoint after round 1")),  # killed before round 2's record
      ((1, 3), 0, ("every checkpoint", "training again from round 1"))]  # before round 1's
  for i, (removed, kept, said) in enumerate(cases):
    run = _copy(straight, tmp_path / str(i))
    for step in removed:
      shutil.rmtree(run / "checkpoints" / str(step))
    (run / "summary.json").unlink()
    (run / "metrics.jsonl").write_text("".join(l + "\n" for l in good[:kept]))
    lines = []
    train_lib.train(CFG, run, resume=True, log=lines.append)
    assert any(all(x in l for x in said) for l in lines), lines
    assert any("moved the unrecorded checkpoint after round 2" in l for l in lines), lines
    assert _records(run) == _records(straight)
    chex.assert_trees_all_equal(_state(run, CFG), _state(straight, CFG))


# -- stop signals -----------------------------------------------------------------------------
def test_sigint_between_rounds_saves_and_resumes_exactly(straight, tmp_path):
  """SIGINT after round 1 (checkpoints only at the end): the run saves round
  1 and stops; a resume ends bit for bit where the straight run ends."""
  cfg = config_lib.override(CFG, ["checkpoint_every=0"])
  run = tmp_path / "run"
  before = signal.getsignal(signal.SIGINT)

  def log(line):
    if line.startswith("round   1/"):
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(stopping.Stopped) as stopped:
    train_lib.train(cfg, run, log=log)
  assert stopped.value.signum == signal.SIGINT and stopped.value.rounds_done == 1
  assert str(stopped.value) == f"SIGINT: stopped after round 1; resume with: hsee train --resume {run}"
  with Checkpointer(run / "checkpoints", create=False) as ck:
    assert ck.steps() == [1]
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored
  train_lib.train(cfg, run, resume=True, **QUIET)
  assert _records(run) == _records(straight)
  chex.assert_trees_all_equal(_state(run, cfg), _state(straight, CFG))


def test_signal_while_the_run_is_built_stops_before_round_1(tmp_path, capsys, monkeypatch):
  """SIGINT or SIGTERM while the data loads and the programs compile (before
  round 1): the run stops there with the documented one line, and a resume
  trains it from round 1."""
  real = train_lib.build

  def build_then_signal(*a, **k):
    out = real(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    return out
  monkeypatch.setattr(train_lib, "build", build_then_signal)
  run = tmp_path / "run"
  cfg_file = _config_file(tmp_path, CFG)
  assert cli.main(["train", "--config", str(cfg_file), "--out", str(run)]) == 143
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"hsee: SIGTERM: stopped before round 1; resume with: hsee train --resume {run}"]
  assert _records(run) == [{"round": 0, "event": "stopped", "error": "SIGTERM after round 0"}]
  assert not (run / "summary.json").exists()
  # Ctrl-C before the handlers are set (JAX starting up): one line, no round spoken of
  def interrupted(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(train_lib, "train", interrupted)
  assert cli.main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "other")]) == 130
  assert capsys.readouterr().err == "hsee: SIGINT: stopped at once, before any round began\n"
  monkeypatch.undo()
  train_lib.train(CFG, run, resume=True, **QUIET)
  assert [r["round"] for r in _records(run)] == list(range(CFG.rounds))


def test_second_signal_abandons_at_once(tmp_path, capsys, monkeypatch):
  run = tmp_path / "run"

  def log(line):
    if line.startswith("round   1/"):
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)   # the second raises here

  with pytest.raises(stopping.Abandoned) as abandoned:
    train_lib.train(CFG, run, log=log)
  assert abandoned.value.signum == signal.SIGTERM and abandoned.value.out == run
  with Checkpointer(run / "checkpoints", create=False) as ck:
    assert ck.steps() == [1]   # round 1's periodic checkpoint; nothing more was saved
  # what the command prints for it: one line, exit code 143
  def abandon(*a, **k):
    raise abandoned.value
  monkeypatch.setattr(train_lib, "train", abandon)
  assert cli.main(["train", "--resume", str(run)]) == 143
  err = capsys.readouterr().err
  assert err == (f"hsee: SIGTERM: stopped at once, the round in flight is lost; last checkpoint: "
                 f"after round 1; resume with: hsee train --resume {run}\n")
  # and a stop after a round, by Ctrl-C: one line, 130
  def stopped(*a, **k):
    raise stopping.Stopped(signal.SIGINT, 3, run)
  monkeypatch.setattr(train_lib, "train", stopped)
  assert cli.main(["train", "--resume", str(run)]) == 130
  assert capsys.readouterr().err == (f"hsee: SIGINT: stopped after round 3; resume with: "
                                     f"hsee train --resume {run}\n")


# -- extending and finished runs --------------------------------------------------------------
def test_extending_a_finished_run(straight, tmp_path, capsys):
  """rounds raised on --resume continues; with a constant learning rate that
  is exactly the longer run (said so); a finished run is left as it is."""
  run = _copy(straight, tmp_path)
  summary = (run / "summary.json").read_bytes()
  assert cli.main(["train", "--resume", str(run)]) == 0
  assert "is finished (3 rounds); nothing to train" in capsys.readouterr().out
  assert (run / "summary.json").read_bytes() == summary
  assert cli.main(["train", "--resume", str(run), "--set", "rounds=2"]) == 2
  assert "rounds: 2, but the checkpoint" in capsys.readouterr().err
  assert cli.main(["train", "--resume", str(run), "--set", "rounds=4"]) == 0
  said = capsys.readouterr().out
  assert "extending" in said and "exactly a run of 4 rounds" in said, said
  longer = config_lib.override(CFG, ["rounds=4"])
  ref = tmp_path / "ref"
  train_lib.train(longer, ref, **QUIET)
  assert _records(run) == _records(ref)
  chex.assert_trees_all_equal(_state(run, longer), _state(ref, longer))
  assert json.loads((run / "config.json").read_text())["rounds"] == 4
  # a decaying schedule: continues, and says plainly it is not the longer run
  cosine = config_lib.override(CFG, ["schedule=cosine", "rounds=1", "local_steps=1"])
  lines = []
  train_lib.train(cosine, tmp_path / "cos", **QUIET)
  train_lib.train(config_lib.override(cosine, ["rounds=2"]), tmp_path / "cos", resume=True,
                  log=lines.append)
  said = " ".join(lines)
  assert "extending" in said and "is not a 2-round run from scratch" in said


def test_overwrite_removes_everything_the_old_run_wrote(straight, tmp_path):
  run = _copy(straight, tmp_path)
  (run / "eval_round2.json").write_text("{}")
  rundir.RunDir(run).prepare(CFG, overwrite=True, resume=False)
  assert sorted(p.name for p in run.iterdir()) == ["config.json"]
  assert json.loads((run / "config.json").read_text()) == CFG.to_dict()


# -- one-line errors --------------------------------------------------------------------------
def _one_line(capsys, argv, pattern):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("hsee: error:") and err.count("\n") == 1 and pattern in err, err


def test_user_errors_are_one_line_with_exit_code_2(straight, tmp_path, capsys):
  cfg_file = _config_file(tmp_path, CFG)
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  _one_line(capsys, ["train", "--config", str(cfg_file), "--out", str(a_file)], "it is a file")
  _one_line(capsys, ["train", "--config", str(cfg_file), "--out", str(a_file / "run")],
            "cannot use")
  _one_line(capsys, ["train", "--config", str(cfg_file), "--out", "/proc/hsee/run"], "cannot use")
  _one_line(capsys, ["sweep", "--config", str(cfg_file), "--out", str(tmp_path / "sw"),
                     "--stack", "0"], "--stack: stacking the runs of a sweep was removed")
  for value, pattern in [("seed=-1", "seed: must be an int in 0..2147483647, got -1"),
                         ("cuts=(True,)", "cut layer True out of range")]:
    _one_line(capsys, ["train", "--config", str(cfg_file), "--out", str(tmp_path / "o"),
                       "--set", value], pattern)
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  _one_line(capsys, ["train", "--config", str(bad), "--out", str(tmp_path / "o")],
            "bad.py: syntax error at line 1")
  bad.write_text("def get_config():\n  raise ValueError('no such preset')\n")
  _one_line(capsys, ["train", "--config", str(bad), "--out", str(tmp_path / "o")],
            "get_config() raised ValueError: no such preset")
  run = _copy(straight, tmp_path)
  (run / "config.json").write_text('{"name": ')
  _one_line(capsys, ["train", "--resume", str(run)], "config.json is damaged: not JSON")
  _one_line(capsys, ["eval", "--run", str(run)], "config.json is damaged: not JSON")


def test_seed_must_be_a_non_negative_int():
  with pytest.raises(ConfigError, match="seed"):
    Config(seed=-1)
  with pytest.raises(ConfigError, match="seed"):
    Config(seed=2**40)


def test_run_directories_with_the_old_metric_names_read_back_with_the_new(straight, tmp_path):
  """Runs written before the metric names were unified (acc_client, server_acc,
  ...) read back under today's names: a finished run's summary, and a resumed
  run's kept records, which it writes back renamed."""
  run = _copy(straight, tmp_path)
  old = {v: k for k, v in rundir.OLD_METRIC_NAMES.items() if k not in ("acc_server",)}
  old["exit_acc"] = "acc_client"  # in training records; evaluation's was exit_acc

  def to_old(obj, in_train=False):
    if isinstance(obj, dict):
      return {(old.get(k, k) if in_train or k not in ("exit_acc",) else k):
              to_old(v, in_train or k in ("train", "train_per_client")) for k, v in obj.items()}
    return [to_old(v, in_train) for v in obj] if isinstance(obj, list) else obj

  lines = (run / "metrics.jsonl").read_text().splitlines()
  (run / "metrics.jsonl").write_text("".join(json.dumps(to_old(json.loads(l))) + "\n" for l in lines))
  summary = json.loads((run / "summary.json").read_text())
  (run / "summary.json").write_text(json.dumps(to_old(summary)))
  assert "acc_client" in (run / "metrics.jsonl").read_text()
  assert "mean_server_acc" in (run / "summary.json").read_text()
  assert train_lib.train(CFG, run, resume=True, **QUIET)["test"] == summary["test"]
  # resumed from round 2: the kept records come back renamed, the run ends as the straight one
  shutil.rmtree(run / "checkpoints" / "3")
  (run / "summary.json").unlink()
  train_lib.train(CFG, run, resume=True, **QUIET)
  assert _records(run) == _records(straight)


def test_non_finite_and_out_of_range_numbers_are_refused():
  """inf and nan anywhere in a config, and step_gamma, weight_decay and the
  simulated clock's rates outside their ranges: one line naming the field."""
  for fields, msg in [(dict(lr=float("inf")), "lr: every number must be finite, got inf"),
                      (dict(dirichlet_alpha=float("inf")), "dirichlet_alpha: every number must be finite"),
                      (dict(momentum=float("nan")), "momentum: every number must be finite, got nan"),
                      (dict(exit_thresholds=(0.1, float("nan"))), "exit_thresholds: every number"),
                      (dict(client_budgets=((float("inf"), 0),)), "client_budgets: every number"),
                      (dict(step_gamma=0.0), "step_gamma: the factor"),
                      (dict(step_gamma=-0.5), r"step_gamma: .* must be > 0, got -0.5"),
                      (dict(weight_decay=-1e-4), "weight_decay: must be >= 0"),
                      (dict(link_bytes_per_s=0), r"link_bytes_per_s: must be in \[1, 1e\+15\]")]:
    with pytest.raises(ConfigError, match=msg):
      Config(**fields)
  assert Config(schedule="step", step_gamma=2.0).step_gamma == 2.0   # a step up is allowed


def test_work_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
  """A batch beyond the training set, and a state that the memory left
  cannot hold: one line, before any state is made, and no run written."""
  with pytest.raises(rundir.RunError, match=r"^batch_size: 200 is more than the 96 training images"):
    train_lib.build(config_lib.override(CFG, ["batch_size=200"]))
  _, sim = train_lib.build(CFG)
  state = precision.tree_bytes(sim.abstract_state())
  monkeypatch.setattr(preflight, "available_memory_bytes", lambda: state // 2)
  with pytest.raises(rundir.RunError) as e:
    train_lib.train(CFG, tmp_path / "run", **QUIET)
  msg = str(e.value)
  assert "this run needs at least" in msg and "for 2 clients" in msg and "\n" not in msg
  assert not (tmp_path / "run" / "checkpoints").exists()
  monkeypatch.setattr(preflight, "available_memory_bytes", lambda: None)
  assert train_lib.build(CFG)[1].cfg == CFG       # unknown memory: no refusal
  # activations count at the compute dtype's size: memory that holds a
  # bfloat16 run's step but not a float32 one's refuses only the float32 run
  f32 = config_lib.override(CFG, ["precision=float32"])
  bf16 = config_lib.override(CFG, ["precision=bfloat16"])
  state32, step32 = preflight.memory_need(train_lib.build(f32)[1], (16, 16, 3))
  state16, step16 = preflight.memory_need(train_lib.build(bf16)[1], (16, 16, 3))
  assert state16 == state32 and step16 * 2 == step32 > 0
  monkeypatch.setattr(preflight, "available_memory_bytes", lambda: state32 + step16 + step16 // 2)
  assert train_lib.build(bf16)[1].cfg == bf16
  with pytest.raises(rundir.RunError, match="this run needs at least"):
    train_lib.build(f32)


def test_eval_prints_its_table_before_a_write_that_fails(straight, tmp_path, capsys, monkeypatch):
  """``hsee eval`` on a run it cannot write into: the table first, then one
  line saying the metrics were not saved (exit code 2)."""
  run = _copy(straight, tmp_path)
  def refuse(path, text):
    raise rundir.RunError(f"cannot write {path}: Read-only file system")
  monkeypatch.setattr(rundir, "write_atomic", refuse)
  assert cli.main(["eval", "--run", str(run)]) == 2
  out, err = capsys.readouterr()
  assert "early exit (per cut" in out and "exit_acc" in out
  assert err.strip().endswith("Read-only file system; the metrics above were not saved")
  assert err.count("\n") == 1 and not list(run.glob("eval_round*.json"))


def test_damaged_records_plans_and_a_lock_on_a_full_disk_are_one_line(straight, tmp_path, capsys,
                                                                     monkeypatch):
  run = _copy(straight, tmp_path)
  good = (run / "metrics.jsonl").read_text()
  # valid JSON that is not a record, and bytes that are not UTF-8
  (run / "metrics.jsonl").write_text("[1, 2]\n" + good)
  _one_line(capsys, ["train", "--resume", str(run)], "line 1 is not a round record")
  (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00" + good.encode())
  _one_line(capsys, ["train", "--resume", str(run)], "metrics.jsonl: not UTF-8 text (byte 0)")
  # a sweep plan that is not one
  sw = tmp_path / "sw"
  sw.mkdir()
  for text in ("[1, 2]", '{"config": {}, "grid": {}}', '{"config": {"lr": -1}, "grid": {}, "seeds": [0]}'):
    (sw / "sweep.json").write_text(text)
    _one_line(capsys, ["sweep", "--resume", str(sw)], "sweep.json is damaged")
  # the lock's note cannot be written (a full disk): one line, and the lock is free again
  real = os.pwrite
  monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
  with pytest.raises(rundir.RunError, match=r"cannot write the lock file .*No space left on device"):
    rundir.RunLock(tmp_path).acquire(lambda s: None)
  monkeypatch.setattr(os, "pwrite", real)
  rundir.RunLock(tmp_path).acquire(lambda s: None).release()


def test_help_answers_without_loading_jax():
  code = ("import sys\nfrom hsee_jax import cli\ntry:\n  cli.main(['--help'])\nexcept SystemExit:\n  pass\n"
          "print('LOADED', sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert "usage: hsee" in r.stdout and "LOADED []" in r.stdout, r.stdout + r.stderr


def test_ctrl_c_before_any_work_and_during_eval_is_one_line(straight, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(cli, "_parser", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
  assert cli.main(["train"]) == 130
  err = capsys.readouterr().err
  assert err == "hsee: SIGINT: stopped before any work began; nothing was written\n"
  # SIGTERM there too (before a run's handlers are set): one line, 143; the handler restored
  before = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(cli, "_parser", lambda: os.kill(os.getpid(), signal.SIGTERM))
  assert cli.main(["train"]) == 143
  assert capsys.readouterr().err == ("hsee: SIGTERM: stopped before any work began; nothing was "
                                     "written\n")
  assert signal.getsignal(signal.SIGTERM) is before
  monkeypatch.undo()
  run = _copy(straight, tmp_path)
  from hsee_jax import evaluation
  monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
  assert cli.main(["eval", "--run", str(run)]) == 130
  err = capsys.readouterr().err
  assert err == "hsee: SIGINT: evaluation stopped; nothing was written\n"
  assert not list(run.glob("eval_round*.json"))
