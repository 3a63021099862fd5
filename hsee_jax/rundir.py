"""A run directory and every file in it, owned by :class:`RunDir`.

``DIR/config.json`` (the config), ``DIR/fleet.json`` (the clients, their
cuts and data sizes), ``DIR/metrics.jsonl`` (one record per round),
``DIR/summary.json`` (written when the run ends), ``DIR/checkpoints/<round>``,
``DIR/tensorboard/`` (event files, by :class:`hsee_jax.writers.TensorBoard`)
and ``DIR/.hsee.lock``. :class:`RunDir` writes them (process 0 only, with
several processes), reads them back and holds the resume rules; nothing
else in the package names these files.

* :class:`RunLock`: an exclusive ``flock`` on ``DIR/.hsee.lock`` held while a
  process trains in ``DIR``; the file names the holder (pid, host, start).
  The kernel drops the lock when its process dies, so a lock file left by a
  dead process is taken over (and said so).
* :meth:`RunDir.prepare`: one-line errors for a file, a path under a file, a
  read-only or unwritable place; with ``overwrite``, removes everything an
  earlier run wrote there.
* :func:`read_records`: ``metrics.jsonl`` with a half-written last line (a
  crash mid-write) dropped with a note.
* :meth:`RunDir.resume`: the state, round and key a run goes on from, and
  the records it keeps (below).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

from hsee_jax import config as config_lib
from hsee_jax.config import Config, ConfigError

LOCK_NAME = ".hsee.lock"
CONFIG, FLEET, METRICS, SUMMARY, CHECKPOINTS, TENSORBOARD = (
    "config.json", "fleet.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard")
# What a run writes into its directory (``--overwrite`` removes all of it).
RUN_FILES = (CONFIG, FLEET, METRICS, METRICS + ".tmp", SUMMARY)
EVAL = "eval_round{}.json"   # hsee eval's result for the checkpoint after round N
RUN_GLOBS = (EVAL.format("*"),)


class RunError(RuntimeError):
  """A run that cannot go on; the message is one line naming the problem.
  ``exit_code``: what ``hsee`` exits with (2: the input is wrong)."""
  exit_code = 2


class WriteError(RunError):
  """A write the machine refused (a full disk, an I/O error): not the
  input's fault, so ``hsee`` exits 1. A run's message names the newest
  checkpoint that restores (:meth:`hsee_jax.checkpoint.Checkpointer.newest_restorable`)."""
  exit_code = 1


# Fault injection for tests: the write named here (``metrics``, ``tensorboard``,
# ``summary``; ``<point>:<round>`` for a round's write) fails as a full disk does.
FAULT_ENOSPC = "HSEE_FAULT_ENOSPC"


def injected_fault(point: str, rnd: int | None = None) -> None:
  """Raise ENOSPC where :data:`FAULT_ENOSPC` names this write (tests only)."""
  want = os.environ.get(FAULT_ENOSPC)
  if want and want in (point, f"{point}:{rnd}"):
    raise OSError(28, f"No space left on device (fault injected by {FAULT_ENOSPC})")


def finite_json(obj, **kw) -> str:
  """``json.dumps`` that refuses NaN and infinity (they are not JSON): a
  one-line :class:`RunError` naming the first non-finite value's place."""
  try:
    return json.dumps(obj, allow_nan=False, **kw)
  except ValueError:
    raise RunError(f"refusing to write a non-finite number as JSON (at {_nonfinite_path(obj)})") from None


def _nonfinite_path(obj, path="") -> str:
  if isinstance(obj, float) and not math.isfinite(obj):
    return path or "top"
  items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
  for k, v in items:
    found = _nonfinite_path(v, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]")
    if found:
      return found
  return ""


def load_config(run: str | Path) -> Config:
  """The config a run directory was trained with (its ``config.json``)."""
  path = Path(run) / CONFIG
  if not path.is_file():
    raise ConfigError(f"{run} holds no run (no config.json)")
  return config_lib.read_json_config(path)


def _oserror(out: Path, e: OSError) -> RunError:
  return RunError(f"cannot use {out} as a run directory: {e.strerror or e}"
                  + (f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""))


def check_dir(path: Path, what: str) -> None:
  """A one-line error (``what: it is a file`` / ``not writable``) where
  ``path`` cannot serve as a directory to write into; a path that does not
  exist yet passes."""
  if path.is_symlink() and not path.exists():
    raise RunError(f"{what}: it is a dangling symbolic link (to {os.readlink(path)}, which "
                   f"does not exist)")
  if path.exists() and not path.is_dir():
    raise RunError(f"{what}: it is a file")
  if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
    raise RunError(f"{what}: not writable")


def make_dir(out: Path) -> None:
  """``out`` as a directory, or a one-line error saying why it cannot be one."""
  what = f"cannot use {out} as a run directory"
  check_dir(out, what)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _oserror(out, e) from None
  check_dir(out, what)


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


def write_atomic(path: Path, text: str) -> None:
  """``path`` holds either its old or its new text, never a part."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    injected_fault(path.stem)
    tmp.write_text(text)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)   # a part written on a full disk goes too
    raise WriteError(f"cannot write {path}: {e.strerror or e}") from None


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
  return current_names(json.loads((Path(run) / SUMMARY).read_text()))


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




def recorded_rounds(records: list[dict]) -> int:
  """How many rounds ``metrics.jsonl`` holds a record of (stop events aside)."""
  return 1 + max((r["round"] for r in records if "event" not in r), default=-1)


@dataclasses.dataclass
class Resumed:
  """Where a resumed run goes on from: its state after round ``start`` and
  the training key (both None: from the seed, round 1 on), the records it
  keeps (rounds before ``start``), ``finished``: the run had ended already
  (nothing to train), and ``extended_from``: the rounds of the run it
  extends (``rounds`` raised), else None."""
  state: Any
  start: int
  train_key: Any
  records: list
  finished: bool
  extended_from: int | None = None


class RunDir:
  """A run directory: its lock, ``config.json``, ``fleet.json``,
  ``metrics.jsonl``, ``summary.json``, checkpoints, and the resume rules.
  ``writer``: this process writes the files (process 0 of several); the
  others read them."""

  def __init__(self, path: str | Path, writer: bool = True):
    self.path = Path(path)
    self.writer = writer
    self.metrics_path = self.path / METRICS
    self.summary_path = self.path / SUMMARY
    self.checkpoint_dir = self.path / CHECKPOINTS

  @contextlib.contextmanager
  def locked(self, log: Callable[[str], None] = print):
    """The directory created and locked (:class:`RunLock`) for the block."""
    if not self.writer:
      yield self
      return
    make_dir(self.path)
    with RunLock(self.path).acquire(log):
      yield self

  def prepare(self, cfg, overwrite: bool, resume: bool) -> None:
    """Check the directory for a new run, a resume or an overwrite (the lock
    is held); a new run's ``config.json`` is written."""
    if not self.writer:
      return
    out = self.path
    if resume:
      if not self.checkpoint_dir.is_dir():
        raise RunError(f"--resume: no checkpoints in {out} (expected {self.checkpoint_dir})"
                       f"{self._start_again()}")
      return
    if self.metrics_path.exists() or self.checkpoint_dir.exists():
      if not overwrite:
        raise RunError(f"output directory {out} already holds a run; pass --resume to continue "
                       f"it or --overwrite to replace it")
      shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
    if overwrite:
      if (out / TENSORBOARD).is_dir():
        shutil.rmtree(out / TENSORBOARD, ignore_errors=True)
      for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
      for pattern in RUN_GLOBS:
        for p in out.glob(pattern):
          p.unlink()
    self.write_config(cfg)

  def _start_again(self) -> str:
    """The way out of a run that cannot be resumed, for its error line."""
    if not (self.path / CONFIG).is_file():
      return ""
    return (f"; to train it again from round 1: hsee train --config {self.path / CONFIG} "
            f"--out {self.path} --overwrite")

  def _write(self, name: str, text: str) -> None:
    if self.writer:
      write_atomic(self.path / name, text)

  def write_config(self, cfg) -> None:
    self._write(CONFIG, finite_json(cfg.to_dict(), indent=2))

  def write_fleet(self, description: dict) -> None:
    self._write(FLEET, finite_json(description))

  def write_summary(self, summary: dict) -> None:
    self._write(SUMMARY, finite_json(summary, indent=2))

  def read_summary(self) -> dict:
    return read_summary(self.path)

  def eval_path(self, rnd: int) -> Path:
    """Where ``hsee eval`` writes its result for the checkpoint after round ``rnd``."""
    return self.path / EVAL.format(rnd)

  def read_records(self, log: Callable[[str], None] = print) -> list[dict]:
    return read_records(self.metrics_path, log)

  def keep_records(self, records: list[dict]) -> Path:
    """``metrics.jsonl`` rewritten to hold ``records`` (one atomic replace);
    its path, for :class:`hsee_jax.writers.MetricsFile` to append to."""
    self._write(METRICS, "".join(finite_json(r) + "\n" for r in records))
    return self.metrics_path

  def checkpointer(self, keep: int, create: bool = True):
    """The run's :class:`hsee_jax.checkpoint.Checkpointer`; a one-line
    :class:`RunError` where it cannot be opened."""
    from hsee_jax.checkpoint import CheckpointError, Checkpointer
    try:
      return Checkpointer(self.checkpoint_dir, keep=keep, create=create)
    except CheckpointError as e:
      raise RunError(str(e)) from None

  def checkpoint_rounds(self) -> list[int]:
    """The rounds after which a checkpoint folder exists (complete or not), read
    without orbax."""
    ckpts = self.checkpoint_dir
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []

  def last_checkpoint(self) -> str:
    """The newest checkpoint on disk, in words (for messages)."""
    rounds = self.checkpoint_rounds()
    return f"after round {rounds[-1]}" if rounds else "none"

  def resume(self, cfg, ckpt, template, log: Callable[[str], None] = print) -> Resumed:
    """Where a run goes on from; ``template``: the state's shapes and dtypes
    (``jax.eval_shape`` of its init), what a checkpoint is restored into.

    A checkpoint is complete on disk before its round's record is written
    (the save runs beside the evaluation whose results the record holds); a
    run stopped between the two has a checkpoint ahead of ``metrics.jsonl``.
    An older checkpoint is then used and the rounds after it recomputed,
    exactly; the checkpoints after it are set aside. Every checkpoint ahead
    of the records (killed before round 1's record): round 1 on, from the
    seed (``state`` None). ``rounds`` may be raised to extend a run
    (``extended_from``; the caller says what that does to the schedule).
    With several processes every one reads the records and checkpoints
    before process 0 moves or rewrites any.
    """
    from hsee_jax import distributed
    records = self.read_records(log)
    recorded = recorded_rounds(records)
    steps = ckpt.steps()
    if not steps:
      raise RunError(f"--resume: no complete checkpoint in {ckpt.directory} (the run stopped "
                     f"before its first one){self._start_again()}")
    extended_from = None
    if min(steps) > recorded:
      log(f"[hsee] metrics.jsonl records {recorded} rounds, every checkpoint of {self.path} is "
          f"after a later round: training again from round 1")
      state, start, train_key = None, 0, None
      self.write_config(cfg)
    else:
      state, start, train_key, extended_from = self._restore(cfg, ckpt, template, recorded, log)
    finished = start == cfg.rounds and self.summary_path.exists()
    if finished:
      log(f"[hsee] {self.path} is finished ({start} rounds); nothing to train. To train longer: "
          f"hsee train --resume {self.path} --set rounds=N (N > {start})")
    distributed.barrier("resume-read")
    for later in [s for s in steps if s > start]:
      if self.writer:
        why = "damaged" if later <= recorded else "unrecorded"
        log(f"[hsee] moved the {why} checkpoint after round {later} to "
            f"{ckpt.set_aside(later, why)}")
    if not finished:
      log(f"[hsee] resuming {self.path} from checkpoint after round {start}")
    return Resumed(state, start, train_key, [r for r in records if r["round"] < start], finished,
                   extended_from)

  def _restore(self, cfg, ckpt, template, recorded: int, log):
    from hsee_jax.checkpoint import key_from_json
    state, meta = restore_state(template, ckpt, cfg, log=log, allowed=("rounds",),
                                prefer_upto=recorded)
    start, old_rounds = int(meta["round"]), int(meta["config"]["rounds"])
    if start > recorded:
      log(f"[hsee] metrics.jsonl has no record of rounds {recorded + 1}-{start}; they were trained "
          f"before the checkpoint after round {start}, which is the newest intact one")
    if start > cfg.rounds:
      raise RunError(f"rounds: {cfg.rounds}, but the checkpoint in {self.path} is after round "
                     f"{start}; give rounds >= {start}")
    extended_from = old_rounds if cfg.rounds != old_rounds else None
    if extended_from is not None:
      self.write_config(cfg)
    return state, start, key_from_json(meta["train_key"]), extended_from


def restore_state(template, ckpt, cfg, step: int | None = None, log: Callable[[str], None] = print,
                  allowed=(), prefer_upto: int | None = None):
  """(state, meta) from the newest intact checkpoint of ``ckpt``, or from
  ``step``, restored into ``template`` (the state's shapes and dtypes).

  A checkpoint from another config is refused (fields in ``allowed`` may
  differ). Without ``step``, a damaged checkpoint is skipped with a note
  saying which and why, and the next older one is tried; with
  ``prefer_upto``, checkpoints after rounds <= it are tried first."""
  from hsee_jax.checkpoint import CheckpointError, config_differences
  steps = ckpt.steps()
  if not steps:
    raise RunError(f"no complete checkpoint in {ckpt.directory}")
  if step is not None and step not in steps:
    raise RunError(f"no checkpoint after round {step} in {ckpt.directory}; have rounds {steps}")
  order = steps[::-1]
  if prefer_upto is not None:
    order = [s for s in order if s <= prefer_upto] + [s for s in order if s > prefer_upto]
  damaged = []
  for s in ([step] if step is not None else order):
    try:
      _, meta = ckpt.restore_meta(s)
      diff = config_differences(meta["config"], cfg, allowed)
      if diff:
        raise RunError(f"checkpoint in {ckpt.directory} is from a different config: "
                       + "; ".join(diff))
      state = ckpt.restore_state(template, s)
    except CheckpointError as e:
      if step is not None:
        others = [o for o in steps if o != s]
        raise RunError(f"{e}" + (f"; other checkpoints: after rounds {others}" if others else ""))
      log(f"[hsee] skipping: {e}")
      damaged.append(s)
      continue
    if damaged:
      log(f"[hsee] using the newest intact checkpoint, after round {s}")
    return state, meta
  raise RunError(f"no intact checkpoint in {ckpt.directory} (damaged: after rounds "
                 f"{sorted(damaged)})")
