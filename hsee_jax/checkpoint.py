"""orbax checkpoints of a whole run.

A checkpoint at step ``s`` holds the state after ``s`` rounds: every client and
server part (parameters, batch statistics, optimiser states) as one pytree,
and as JSON the round number, the training PRNG key, the data-order position
(data order is a pure function of seed, round and client, so the round is the
position) and the config. orbax writes each step into a temporary directory
and renames it when complete, so a crash mid-save leaves the previous step as
the newest usable one.

A save is checked (:meth:`Checkpointer.finish`): a failed write (a full disk,
say) is reported with its cause, and older checkpoints are removed (beyond
``keep``) only after the new one is complete, so a failed save never costs
the previous checkpoint.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from hsee_jax import distributed
from hsee_jax.config import Config, field_defaults, run_fields

# Fault injection for tests: SIGKILL this process right after the save of this
# step is dispatched (while the asynchronous write is under way).
_KILL_DURING_SAVE = "HSEE_FAULT_KILL_DURING_SAVE"


# Fault injection for tests where no small filesystem can be mounted: the
# save of this step fails as a full disk would.
_FAIL_SAVE = "HSEE_FAULT_FAIL_SAVE"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; one line naming the problem."""


def config_differences(saved: dict, cfg: Config, allowed=()) -> list[str]:
  """What differs between a checkpoint's config and ``cfg``, leaving out the
  fields that do not change results (``config.run_only``) and ``allowed``; a
  field the saved config predates counts as its default."""
  now, default = cfg.to_dict(), field_defaults()
  keys = sorted((set(saved) | set(now)) - run_fields() - set(allowed))
  return [f"{k}: checkpoint {saved.get(k, default.get(k))!r}, now {now.get(k)!r}"
          for k in keys if saved.get(k, default.get(k)) != now.get(k)]


# Operating-system failures a save or restore can meet, named in their own
# words when a library buries them in a long message.
_OS_ERRORS = tuple(os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                           errno.EACCES, errno.EIO, errno.ENOENT))


def first_line(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line: the operating-system error it carries,
  if any, then its type and the start of its first line."""
  text = str(e).strip()
  line = text.splitlines()[0] if text else ""
  short = f"{type(e).__name__}: {line[:limit]}" if line else type(e).__name__
  found = next((m for m in _OS_ERRORS if m in text), None)
  if found and found not in line[:limit]:
    return f"{found} ({short[:120]}...)"
  return short


class _OrbaxErrors(logging.Handler):
  """Keeps the last error orbax logged: orbax logs, and does not raise, some
  failures of its background save thread."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.last: str | None = None

  def emit(self, record):
    if record.exc_info and record.exc_info[1] is not None:
      self.last = first_line(record.exc_info[1])
    else:
      self.last = record.getMessage().splitlines()[0][:300]


class Checkpointer:
  """Save and restore run state under ``directory`` (one sub-directory a step)."""

  def __init__(self, directory: str | Path, keep: int = 3, asynchronous: bool = True,
               create: bool = True):
    self.directory = Path(directory).resolve()
    self.keep = keep
    if not create and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoint directory at {self.directory}")
    self._errors = _OrbaxErrors()
    logging.getLogger("absl").addHandler(self._errors)
    # retention is ours (``finish``): orbax would delete old steps even after
    # a failed save
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                             enable_async_checkpointing=asynchronous,
                                             cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def reload(self) -> None:
    """Read the checkpoint directory again (another process changed it)."""
    self.manager.reload()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    """Start saving ``step`` (asynchronously); :meth:`finish` checks it."""
    self._errors.last = None
    try:
      if os.environ.get(_FAIL_SAVE) == str(step):
        raise OSError(28, "No space left on device (fault injected by " + _FAIL_SAVE + ")")
      if step in self.steps():
        raise FileExistsError(f"a checkpoint after round {step} already exists")
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # noqa: BLE001  (orbax and the filesystem raise many types)
      self._discard(step)
      raise CheckpointError(f"saving the checkpoint after round {step} failed: "
                            f"{first_line(e)}") from None
    if os.environ.get(_KILL_DURING_SAVE) == str(step):
      os.kill(os.getpid(), signal.SIGKILL)

  def finish(self, step: int) -> None:
    """Wait for the save of ``step`` and check it is complete on disk; then
    drop checkpoints beyond the newest ``keep``. A failed save raises
    :class:`CheckpointError` with its cause; older checkpoints stay."""
    cause = None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      cause = first_line(e)
    self.manager.reload()
    if cause is None and step not in self.steps():
      cause = self._errors.last or "orbax did not complete it"
    if cause is not None:
      self._discard(step)
      raise CheckpointError(f"saving the checkpoint after round {step} failed: {cause}")
    for old in self.steps()[:-self.keep]:
      self.manager.delete(old)

  def settle(self) -> None:
    """Wait for a save in flight to end, whatever its outcome (its failure
    is :meth:`finish`'s to report), and read the directory again."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # noqa: BLE001
      pass
    self.manager.reload()

  def restores(self, step: int) -> bool:
    """Whether checkpoint ``step`` is complete on disk and its metadata and
    its state's layout read back (checked, not assumed from its name)."""
    try:
      self.restore_meta(step)
      ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
    except Exception:  # noqa: BLE001  (a damaged or missing file: any error means no)
      return False
    return True

  def newest_restorable(self, upto: int | None = None) -> int | None:
    """The newest checkpoint that :meth:`restores` (after rounds <= ``upto``,
    where given: those a resume goes on from), once a save in flight has ended."""
    self.settle()
    return next((s for s in reversed(self.steps()) if (upto is None or s <= upto)
                 and self.restores(s)), None)

  def set_aside(self, step: int, why: str = "damaged") -> Path:
    """Rename checkpoint ``step`` (a damaged one, or one the resumed run
    recomputes) out of orbax's sight, kept for inspection: ``<step>.<why>``."""
    src = self.directory / str(step)
    dst = self.directory / f"{step}.{why}"
    n = 1
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.{why}{n}"
    src.rename(dst)
    self.reload()
    return dst

  def _discard(self, step: int) -> None:
    """Remove what a failed save of ``step`` left (its temporary directory;
    process 0 does, where several processes save together)."""
    if not distributed.is_writer():
      return
    for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(p, ignore_errors=True)

  def _check_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    if step not in self.steps():
      raise CheckpointError(f"no checkpoint after round {step} in {self.directory}; "
                            f"have rounds {self.steps()}")
    return step

  def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of ``step`` (default: the newest complete one)."""
    step = self._check_step(step)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict) or not {"round", "train_key", "config"} <= set(meta):
        raise ValueError("its metadata lacks round, train_key or config")
    except Exception as e:  # noqa: BLE001  (a damaged file: JSON, orbax or OS errors)
      raise CheckpointError(f"checkpoint after round {step} is damaged: its metadata cannot be "
                            f"read ({first_line(e)})") from None
    return step, meta

  def restore_state(self, abstract_state, step: int):
    """The state pytree of ``step``, shaped like ``abstract_state``."""
    step = self._check_step(step)
    # without a sharding of its own, every array is read whole onto this
    # process's first device, whatever devices and processes saved it
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(x):
      s = ocp.utils.to_shape_dtype_struct(x)
      return (s if getattr(s, "sharding", None) is not None
              else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device))
    target = jax.tree.map(target, abstract_state)
    restore = lambda item: self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))["state"]
    try:
      try:
        restored = restore(target)
      except Exception:  # noqa: BLE001
        older = self._saved_fields(step, target)
        if older is None:
          raise
        restored = target.replace(**restore(older))
    except Exception as e:  # noqa: BLE001  (orbax and TensorStore raise many types)
      raise CheckpointError(f"checkpoint after round {step} could not be restored: orbax "
                            f"says {first_line(e)}") from None
    if jax.process_count() > 1:
      # as fresh (uncommitted) arrays, which the run lays over the global mesh
      # as it does a new state; arrays committed to one device would need a
      # cross-host transfer there
      return jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a)), restored)
    return restored

  def _saved_fields(self, step: int, target) -> dict | None:
    """A checkpoint saved before the state gained a field that holds nothing
    by default (an empty dict): the fields it has, as a dict to restore, the
    new ones then taken from ``target``. None when ``target`` is not such a
    state or a missing field holds arrays (a real mismatch)."""
    if not dataclasses.is_dataclass(target):
      return None
    try:
      saved = ocp.StandardCheckpointer().metadata(
          self.directory / str(step) / "state").item_metadata
    except Exception:  # noqa: BLE001  (no readable metadata: the first error stands)
      return None
    names = [f.name for f in dataclasses.fields(target)]
    new = [n for n in names if n not in saved]
    if not new or any(jax.tree.leaves(getattr(target, n)) for n in new):
      return None
    return {n: getattr(target, n) for n in names if n in saved}

  def close(self) -> None:
    try:
      self.manager.close()
    finally:
      logging.getLogger("absl").removeHandler(self._errors)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    try:
      self.close()  # waits for a save in flight: a finished checkpoint is never lost
    except Exception:  # noqa: BLE001
      if exc[0] is None:
        raise  # else the error already on its way up is the one to report


def key_to_json(key) -> list[int]:
  return np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                    else key).astype(np.uint32).tolist()


def key_from_json(data) -> jax.Array:
  return jax.numpy.asarray(np.asarray(data, np.uint32))


def meta_for(cfg: Config, rounds_done: int, train_key) -> dict:
  return {"round": rounds_done, "train_key": key_to_json(train_key),
          "data_order": {"seed": cfg.seed, "next_round": rounds_done},
          "config": cfg.to_dict()}

