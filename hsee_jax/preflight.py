"""The memory preflight: work that cannot run is refused in one line before
any state is made (:func:`check_fits`, called by :func:`hsee_jax.train.build`)."""
from __future__ import annotations

import math
from pathlib import Path

import jax

from hsee_jax import data as data_lib
from hsee_jax import precision as precision_lib
from hsee_jax.rundir import RunError


def available_memory_bytes() -> int | None:
  """Memory the run's arrays can still take: on the CPU the host's
  ``MemAvailable`` (``/proc/meminfo``), on an accelerator the first device's
  limit less what is in use; None where neither is known."""
  if jax.default_backend() == "cpu":
    try:
      for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
      return None
    return None
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def memory_need(sim, image_shape: tuple) -> tuple[int, int]:
  """(persistent state, one compiled call's activations) in bytes, the lower
  bound :func:`check_fits` holds against the memory left: the state as
  stored (float32), and every unit's output for each image of a batch of
  every client trained in one call, in the compute dtype (``precision``:
  bfloat16 counts half of float32)."""
  cfg = sim.cfg
  state = precision_lib.tree_bytes(sim.abstract_state())
  values = sum(math.prod(sim.net.unit_output_shape(k, image_shape))
               for k in range(1, sim.net.num_units + 1))
  parallel = sim.ctx.chunk if sim.ctx.mode in ("vmap", "unrolled") else 1
  itemsize = precision_lib.itemsize(precision_lib.resolve(cfg.precision))
  return state, itemsize * values * cfg.batch_size * min(parallel, cfg.cohort_size)


def check_fits(sim, dataset: data_lib.Dataset) -> None:
  """Refuse, in one line and before any state is made, work that cannot run:
  a batch larger than the whole training set (a client whose data is smaller
  than a batch repeats its images within the batch; docs/usage.md), or the
  lower bound of :func:`memory_need` beyond :func:`available_memory_bytes`."""
  cfg = sim.cfg
  n_train = len(dataset.train_labels)
  if cfg.batch_size > n_train:
    raise RunError(f"batch_size: {cfg.batch_size} is more than the {n_train} training images "
                   f"of {dataset.name}; a batch draws from one client's data")
  available = available_memory_bytes()
  if available is None:
    return
  state, step = memory_need(sim, dataset.image_shape)
  if state + step > available:
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    raise RunError(f"this run needs at least {gib(state + step)} (persistent state "
                   f"{gib(state)} for {cfg.fleet_size} clients, activations of one step "
                   f"{gib(step)}), more than the {gib(available)} available on "
                   f"{jax.default_backend()}; lower batch_size, client_chunk or the number of "
                   f"clients, or use client_state=reset")
