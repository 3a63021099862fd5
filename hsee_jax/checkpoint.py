"""orbax checkpoints of a whole run.

A checkpoint at step ``s`` holds the state after ``s`` rounds: every client and
server part (parameters, batch statistics, optimiser states) as one pytree,
and as JSON the round number, the training PRNG key, the data-order position
(data order is a pure function of seed, round and client, so the round is the
position) and the config. orbax writes each step into a temporary directory
and renames it when complete, so a crash mid-save leaves the previous step as
the newest usable one; ``max_to_keep`` keeps the last k.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from hsee_jax.config import Config

# Fields that may change between a checkpoint and its resume: they manage the
# run, not what it computes.
RUN_FIELDS = frozenset({"name", "eval_every", "eval_batch_size", "checkpoint_every",
                        "keep_checkpoints", "exit_thresholds", "mode",
                        "shard_clients", "client_chunk", "eval_clients"})

# Fault injection for tests: SIGKILL this process right after the save of this
# step is dispatched (while the asynchronous write is under way).
_KILL_DURING_SAVE = "HSEE_FAULT_KILL_DURING_SAVE"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; one line naming the problem."""


def config_differences(saved: dict, cfg: Config) -> list[str]:
  now = cfg.to_dict()
  keys = sorted((set(saved) | set(now)) - RUN_FIELDS)
  return [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
          for k in keys if saved.get(k) != now.get(k)]


class Checkpointer:
  """Save and restore run state under ``directory`` (one sub-directory a step)."""

  def __init__(self, directory: str | Path, keep: int = 3, asynchronous: bool = True,
               create: bool = True):
    self.directory = Path(directory).resolve()
    if not create and not self.directory.is_dir():
      raise CheckpointError(f"no checkpoint directory at {self.directory}")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                             enable_async_checkpointing=asynchronous,
                                             cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)))
    if os.environ.get(_KILL_DURING_SAVE) == str(step):
      os.kill(os.getpid(), signal.SIGKILL)

  def _check_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    if step not in self.steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"have {self.steps()}")
    return step

  def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of ``step`` (default: the newest complete one)."""
    step = self._check_step(step)
    return step, self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_state(self, abstract_state, step: int):
    """The state pytree of ``step``, shaped like ``abstract_state``."""
    step = self._check_step(step)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001  (orbax raises many types for a mismatch)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this "
                            f"model: {first[:300]}") from None
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()  # waits for a save in flight: a finished checkpoint is never lost


def key_to_json(key) -> list[int]:
  return np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                    else key).astype(np.uint32).tolist()


def key_from_json(data) -> jax.Array:
  return jax.numpy.asarray(np.asarray(data, np.uint32))


def meta_for(cfg: Config, rounds_done: int, train_key) -> dict:
  return {"round": rounds_done, "train_key": key_to_json(train_key),
          "data_order": {"seed": cfg.seed, "next_round": rounds_done},
          "config": cfg.to_dict()}

