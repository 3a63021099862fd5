"""Several processes (hosts) as one JAX job, through ``jax.distributed``.

Every process runs the same ``hsee`` command; :func:`initialize` joins them
before JAX starts a backend. Where JAX detects the cluster itself (Cloud TPU
pods, SLURM, Open MPI) nothing else is needed; elsewhere the coordinator
(process 0's host and a free port), the number of processes and this
process's id come from ``--coordinator HOST:PORT --num-processes N
--process-id I`` or from the environment variables ``JAX_COORDINATOR_ADDRESS``,
``HSEE_NUM_PROCESSES`` and ``HSEE_PROCESS_ID``. On CPUs the cross-process
collectives are gloo's.
"""
from __future__ import annotations

import atexit
import itertools
import os
import socket
import sys
import threading
import time

from hsee_jax.config import ConfigError

ENV_NUM_PROCESSES = "HSEE_NUM_PROCESSES"
ENV_PROCESS_ID = "HSEE_PROCESS_ID"
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"   # jax.distributed reads it too
DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
  """The processes could not be joined; one line naming why."""


def _int_env(name: str) -> int | None:
  v = os.environ.get(name)
  if v in (None, ""):
    return None
  try:
    return int(v)
  except ValueError:
    raise ConfigError(f"{name}={v!r}: expected an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """Join this process to the others (``jax.distributed.initialize``); call
  before anything else touches JAX's devices. Arguments left None come from
  the environment, then from JAX's cluster detection. Raises
  :class:`DistributedError` (one line) when the coordinator cannot be reached
  within ``timeout_s``, and ConfigError on inconsistent arguments."""
  import jax
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
  if coordinator is not None and ":" not in coordinator:
    raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT")
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num-processes {num_processes}: expected 1 or more")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id {process_id}: expected 0..{num_processes - 1}")
  if jax.distributed.is_initialized():
    return
  if coordinator is not None and process_id not in (None, 0):
    # XLA's client aborts the whole process (no Python exception) when the
    # coordinator does not answer in time: wait for it here first
    _wait_for(coordinator, process_id, num_processes, timeout_s)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
  except Exception as e:  # noqa: BLE001  (XLA's runtime raises its own types)
    text = str(e).strip()
    first = text.splitlines()[0][:200] if text else type(e).__name__
    where = f"the coordinator at {coordinator}" if coordinator else "the cluster"
    if ("coordinator_address should be defined" in text
            or "must be defined" in text):
      raise DistributedError(
          "--distributed: no cluster detected; give --coordinator HOST:PORT "
          "--num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS, "
          f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})") from None
    raise DistributedError(f"--distributed: could not join {where} as process "
                           f"{process_id} of {num_processes} within {timeout_s} s "
                           f"({type(e).__name__}: {first})") from None
  if jax.process_count() > 1:
    threading.Thread(target=_watch_failures, name="hsee-failure-watch", daemon=True).start()
    atexit.register(_exiting.set)  # runs before JAX's own shutdown (registered earlier)


def _wait_for(coordinator: str, process_id, num_processes, timeout_s: int) -> None:
  """Return once ``HOST:PORT`` accepts a TCP connection; else, after
  ``timeout_s``, raise :class:`DistributedError`."""
  host, _, port = coordinator.rpartition(":")
  try:
    port = int(port)
  except ValueError:
    raise ConfigError(f"--coordinator {coordinator!r}: the port is not a number") from None
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  last = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      last = e
      time.sleep(0.2)
  raise DistributedError(f"--distributed: could not reach the coordinator at {coordinator} "
                         f"(process {process_id} of {num_processes}) within {timeout_s} s: "
                         f"{getattr(last, 'strerror', None) or last}")


def process_index() -> int:
  import jax
  return jax.process_index()


def is_writer() -> bool:
  """Process 0 writes metrics, summaries, plots and progress; the others compute."""
  return process_index() == 0


def writer_log(log):
  """``log`` on process 0; on the others, a log that drops every line."""
  return log if is_writer() else (lambda _: None)


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: int = 600) -> None:
  """Every process waits here for the others (a no-op in a single process)."""
  import jax
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp
  ocp.multihost.sync_global_processes(f"hsee-{name}-{next(_BARRIERS)}", timeout=timeout_s)


def agreed_stop(signum: int | None) -> int | None:
  """Whether to stop at this round boundary: with several processes, the
  same answer on every process (a stop signal that reached any of them: the
  lowest process's signal number), so that all of them stop after the same
  round and save it together; alone, ``signum`` itself. Every process must
  call it at the same points (one small all-gather)."""
  if not several_processes():
    return signum
  import numpy as np
  from jax.experimental import multihost_utils
  got = [int(s) for s in np.ravel(multihost_utils.process_allgather(np.int32(signum or 0))) if s]
  return got[0] if got else None


# -- one process fails: every process stops, each with one line ---------------------------
# A process that fails alone would leave the others waiting in a collective
# or a barrier, and itself in JAX's shutdown barrier, until timeouts end them
# all with XLA's multi-line aborts. Instead it posts its error in the
# coordination service's key-value store; a thread in every process watches
# for one and ends its process with one line. Keys: failed/<id> (the error),
# seen/<id> (this process knows), gone/<id> (done with the service).
# Process 0 hosts the service, so it leaves last.
_KEY = "hsee/failure/"
_POLL_S = 0.5
_GRACE_S = 10.0
_failing = threading.Event()      # this process is stopping (its own error or another's)
_other_failed = threading.Event()  # ... because another process failed
_exiting = threading.Event()       # the interpreter is exiting normally


def yield_to_watcher() -> None:
  """Where another process's failure is ending this one, errors that follow
  from it here (a collective whose peer is gone) are not reported: wait for
  the watcher to end the process."""
  if _other_failed.is_set():
    time.sleep(3 * _GRACE_S)


def _client():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def _ids(client, kind: str) -> set[int]:
  return {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(_KEY + kind + "/")}


def _leave(client, me: int, code: int) -> None:
  """Say this process is done with the service (process 0: wait until the
  others are), flush, and end the process at once (no shutdown barrier)."""
  import jax
  try:
    client.key_value_set(f"{_KEY}gone/{me}", "1", allow_overwrite=True)
    others = set(range(jax.process_count())) - {me}
    deadline = time.monotonic() + _GRACE_S
    while me == 0 and not others <= _ids(client, "gone") and time.monotonic() < deadline:
      time.sleep(_POLL_S)
  except Exception:  # noqa: BLE001  (the service may be gone already)
    pass
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def several_processes() -> bool:
  import jax
  return jax.distributed.is_initialized() and jax.process_count() > 1


def fail(message: str, code: int) -> None:
  """Print ``hsee: error: <message>`` (one line). With several processes,
  end this process and every other one of the run now (no return); alone,
  return."""
  print(f"hsee: error: {message}", file=sys.stderr, flush=True)
  stop_all(message, code)


def stop_all(message: str, code: int) -> None:
  """With several processes, end this process with ``code`` and every other
  one with one line giving ``message`` (no return); alone, return."""
  if not several_processes():
    return
  import jax
  _failing.set()
  client, me = _client(), jax.process_index()
  try:
    client.key_value_set(f"{_KEY}failed/{me}", message, allow_overwrite=True)
    client.key_value_set(f"{_KEY}seen/{me}", "1", allow_overwrite=True)
    deadline = time.monotonic() + _GRACE_S
    while (len(_ids(client, "seen")) < jax.process_count()
           and time.monotonic() < deadline):
      time.sleep(_POLL_S)
  except Exception:  # noqa: BLE001
    pass
  _leave(client, me, code)


def _watch_failures() -> None:
  import jax
  client, me = _client(), jax.process_index()
  while not (_failing.is_set() or _exiting.is_set()):
    try:
      failed = client.key_value_dir_get(_KEY + "failed/")
    except Exception:  # noqa: BLE001  (the service is gone: JAX reports that itself)
      return
    if failed and not _failing.is_set():
      _other_failed.set()
      _failing.set()
      key, message = sorted(failed)[0]
      print(f"hsee: error: process {key.rsplit('/', 1)[-1]} failed, so process {me} stops: "
            f"{message}", file=sys.stderr)
      try:
        client.key_value_set(f"{_KEY}seen/{me}", "1", allow_overwrite=True)
      except Exception:  # noqa: BLE001
        pass
      _leave(client, me, 2)
    _exiting.wait(_POLL_S)


# -- several processes on one machine (tests, benchmarks) ---------------------------------
def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for a coordinator on this machine)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
  """The environment of a child process that sees ``devices`` CPU devices
  (this process's other XLA flags kept)."""
  flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                 f"--xla_force_host_platform_device_count={devices}"]))
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
