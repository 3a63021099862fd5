"""Stopping a run on a signal: SIGINT and SIGTERM ask the run to stop after
the round in flight (which then saves a checkpoint, :class:`Stopped`); a
second signal abandons the round at once (:class:`Abandoned`)."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable


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
