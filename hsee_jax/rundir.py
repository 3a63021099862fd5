"""A run directory kept safe: one process at a time, files hsee owns, the
metrics history read back after a crash, and stop signals turned into a
clean stop.

* :class:`RunLock`: an exclusive ``flock`` on ``DIR/.hsee.lock`` held while a
  process trains in ``DIR``; the file names the holder (pid, host, start).
  The kernel drops the lock when its process dies, so a lock file left by a
  dead process is taken over (and said so).
* :func:`prepare`: creates ``DIR`` (one-line errors for a file, a path under a
  file, a read-only or unwritable place) and, with ``overwrite``, removes
  everything an earlier run wrote there.
* :func:`read_records`: ``metrics.jsonl`` with a half-written last line (a
  crash mid-write) dropped with a note.
* :class:`StopSignals`: SIGINT and SIGTERM ask the run to stop after the round
  in flight (which then saves a checkpoint); a second signal abandons the
  round at once.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

LOCK_NAME = ".hsee.lock"
# What a run writes into its directory (``--overwrite`` removes all of it).
RUN_FILES = ("config.json", "fleet.json", "metrics.jsonl", "metrics.jsonl.tmp", "summary.json")
RUN_GLOBS = ("eval_round*.json",)


class RunError(RuntimeError):
  """A run that cannot go on; the message is one line naming the problem."""


class Stopped(Exception):
  """The run stopped on a signal after ``rounds_done`` rounds, all saved."""

  def __init__(self, signum: int, rounds_done: int, out: Path, sweep: str | Path | None = None):
    self.signum, self.rounds_done, self.out = signum, rounds_done, out
    how = f"hsee sweep --resume {sweep}" if sweep else f"hsee train --resume {out}"
    when = f"after round {rounds_done}" if rounds_done else "before round 1"
    super().__init__(f"{signal.Signals(signum).name}: stopped {when}"
                     f"{f' of {out}' if sweep else ''}; resume with: {how}")


class Abandoned(BaseException):
  """A second stop signal: the round in flight is abandoned, nothing more is saved.

  A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except
  Exception`` on the way up swallows it."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(signal.Signals(signum).name)


def _oserror(out: Path, e: OSError) -> RunError:
  return RunError(f"cannot use {out} as a run directory: {e.strerror or e}"
                  + (f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""))


def make_dir(out: Path) -> None:
  """``out`` as a directory, or a one-line error saying why it cannot be one."""
  if out.exists() and not out.is_dir():
    raise RunError(f"cannot use {out} as a run directory: it is a file")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _oserror(out, e) from None
  if not os.access(out, os.W_OK):
    raise RunError(f"cannot use {out} as a run directory: not writable")


class RunLock:
  """An exclusive lock on a run directory for the life of a process's run."""

  def __init__(self, out: Path):
    self.out = out
    self.path = out / LOCK_NAME
    self.fd: int | None = None

  def acquire(self, log: Callable[[str], None] = print) -> "RunLock":
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise _oserror(self.out, e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise RunError(f"{self.out} is in use by {holder}; wait for it to end, or use "
                     f"another --out") from None
    left = os.pread(fd, 512, 0).decode(errors="replace").strip()
    if left:  # the kernel freed the lock: whoever wrote this is gone
      log(f"[hsee] {self.out}: taking over the lock left by {left}, which is no longer running")
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (f"hsee process {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
    except OSError as e:  # a full disk: the lock holds, its note cannot be written
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise RunError(f"cannot write the lock file {self.path}: {e.strerror or e}") from None
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds the directory
      os.close(self.fd)         # closing drops the flock
      self.fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def prepare(out: Path, config_json: str, overwrite: bool, resume: bool) -> None:
  """Check ``out`` for a new run, a resume or an overwrite (the lock is held)."""
  ckpt_dir = out / "checkpoints"
  if resume:
    if not ckpt_dir.is_dir():
      raise RunError(f"--resume: no checkpoints in {out} (expected {ckpt_dir})")
    return
  if (out / "metrics.jsonl").exists() or ckpt_dir.exists():
    if not overwrite:
      raise RunError(f"output directory {out} already holds a run; pass --resume to continue "
                     f"it or --overwrite to replace it")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
  if overwrite:
    for name in RUN_FILES:
      (out / name).unlink(missing_ok=True)
    for pattern in RUN_GLOBS:
      for p in out.glob(pattern):
        p.unlink()
  write_atomic(out / "config.json", config_json)


def write_atomic(path: Path, text: str) -> None:
  """``path`` holds either its old or its new text, never a part."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)   # a part written on a full disk goes too
    raise RunError(f"cannot write {path}: {e.strerror or e}") from None


# Metric names of run directories written before the names were unified
# (one name per metric from training to evaluation to files).
OLD_METRIC_NAMES = {"loss_client": "exit_loss", "loss_server": "full_loss",
                    "acc_client": "exit_acc", "acc_server": "full_acc",
                    "server_acc": "full_acc", "mean_server_acc": "mean_full_acc"}


def current_names(obj):
  """``obj`` (a record or summary, read back) with old metric names renamed."""
  if isinstance(obj, dict):
    return {OLD_METRIC_NAMES.get(k, k): current_names(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [current_names(v) for v in obj]
  return obj


def read_summary(run: Path) -> dict:
  """A run's ``summary.json`` (current metric names)."""
  return current_names(json.loads((Path(run) / "summary.json").read_text()))


def read_records(path: Path, log: Callable[[str], None] = print) -> list[dict]:
  """The records of ``metrics.jsonl`` (current metric names); a half-written
  last line is dropped with a note, a damaged line before it is an error."""
  if not path.exists():
    return []
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise RunError(f"{path}: not UTF-8 text (byte {e.start}); the metrics history is "
                   f"damaged") from None
  except OSError as e:
    raise RunError(f"cannot read {path}: {e.strerror or e}") from None
  lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
  records = []
  for j, (number, line) in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if j == len(lines) - 1:
        log(f"[hsee] {path}: dropped a half-written last line (line {number}; a crash mid-write)")
        break
      raise RunError(f"{path}: line {number} is not JSON ({e.msg}); the metrics history is "
                     f"damaged") from None
    if not isinstance(record, dict) or not isinstance(record.get("round"), int) or \
        isinstance(record.get("round"), bool):
      raise RunError(f"{path}: line {number} is not a round record (a JSON object with an "
                     f"integer \"round\"); the metrics history is damaged")
    records.append(current_names(record))
  return records


class StopSignals:
  """Turn SIGINT / SIGTERM into a stop after the round in flight.

  ``requested`` is the first signal's number (None until one arrives); the
  training loop checks it between rounds. A second signal raises
  :class:`Abandoned` at once. Handlers are installed only in the main thread
  (signal handlers cannot be set elsewhere) and restored on exit.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, log: Callable[[str], None] = print):
    self.log = log
    self.requested: int | None = None
    self._old: dict = {}

  def _handle(self, signum, frame):
    if self.requested is not None:
      raise Abandoned(signum)
    self.requested = signum
    self.log(f"[hsee] {signal.Signals(signum).name}: stopping after the round in flight and "
             f"saving a checkpoint (send it again to stop at once, unsaved)")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
