"""Stopping on a signal: SIGINT and SIGTERM ask a run to stop after the
round in flight (which then saves a checkpoint, :class:`Stopped`); a second
signal abandons the round at once (:class:`Abandoned`). Before a run's
handlers are set (the command starting, JAX loading, the run being built)
and during ``hsee eval``, :func:`early_signals` stops the command at once
(:class:`Early`), and remembers the signal, so that one raised where Python
cannot pass it on (a garbage-collector callback, a ``__del__``) still stops
the command at the next :func:`check_early`, and one that a library turned
into an error of its own (an extension module's initialisation) still ends
the command as that signal. A signal that comes while a module is being
imported is not raised there (an exception inside an extension module's
initialisation prints its traceback from C, or crashes the interpreter): it
is delivered again every 50 ms until the import is over."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

_early: int | None = None   # the first signal :func:`early_signals` caught, until it ends


class Early(BaseException):
  """A stop signal before a run's handlers were set (or during an evaluation)."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(signal.Signals(signum).name)


def _importing(frame) -> bool:
  while frame is not None:
    if frame.f_code.co_filename.startswith("<frozen importlib"):
      return True
    frame = frame.f_back
  return False


def _again(signum: int) -> None:
  if signal.getsignal(signum) is _early_handler:   # still before the run's own handlers
    os.kill(os.getpid(), signum)


def _early_handler(signum, frame):
  global _early
  if _early is None:
    _early = signum
  if _importing(frame):
    timer = threading.Timer(0.05, _again, (signum,))
    timer.daemon = True
    timer.start()
    return
  raise Early(signum)


def check_early() -> None:
  """Raise :class:`Early` if a signal came while :func:`early_signals` was on
  (it may have been raised where it was swallowed)."""
  if _early is not None:
    raise Early(_early)


@contextlib.contextmanager
def early_signals():
  """SIGINT and SIGTERM stop the command at once (:class:`Early`) for the
  block, and are remembered (:func:`check_early`); the handlers before it
  come back after. Only the main thread can set handlers; elsewhere a no-op."""
  global _early
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {s: signal.signal(s, _early_handler) for s in StopSignals.SIGNALS}
  _early = None
  default_hook = sys.unraisablehook

  def hook(unraisable):  # swallowed where it was raised: remembered, said in one line later
    if not (isinstance(unraisable.exc_type, type) and issubclass(unraisable.exc_type, Early)):
      default_hook(unraisable)
  sys.unraisablehook = hook
  try:
    yield
  except Exception as e:
    # An extension module whose initialisation the handler interrupted turns
    # the signal into its own error (tensorstore: "ImportError:
    # initialization failed"); the signal is the cause, not a bug.
    if _early is not None:
      raise Early(_early) from e
    raise
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    if sys.unraisablehook is hook:
      sys.unraisablehook = default_hook
    _early = None


class Stopped(Exception):
  """The run stopped on a signal after ``rounds_done`` rounds, all saved."""

  def __init__(self, signum: int, rounds_done: int, out: Path, sweep: str | Path | None = None,
               note: str | None = None):
    self.signum, self.rounds_done, self.out, self.note = signum, rounds_done, out, note
    how = f"hsee sweep --resume {sweep}" if sweep else f"hsee train --resume {out}"
    when = f"after round {rounds_done}" if rounds_done else "before round 1"
    what = note or f"stopped {when}{f' of {out}' if sweep else ''}"
    super().__init__(f"{signal.Signals(signum).name}: {what}; resume with: {how}")


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
    check_early()  # a signal swallowed before the run's handlers were set stops it here
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
