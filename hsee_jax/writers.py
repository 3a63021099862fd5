"""Metric writers: what a run does with each round's record.

A writer (:class:`Writer`) has ``begin(cfg, records)`` (the run's config
and the records it already holds: a resumed run's kept rounds, else none),
``write_round(record)``, ``write_event(record)`` (a run that stops says why)
and ``close()``; :func:`hsee_jax.train.run_rounds` calls the run's writers in
order after each round. A writer's constructor only checks where it will
write, raising a one-line :class:`hsee_jax.rundir.RunError`. A run's writers
are:

* :class:`MetricsFile`: the record appended to ``metrics.jsonl`` (first:
  what a resume trusts; every process keeps the newest test metrics, only
  process 0 writes);

and those of :func:`for_config` (process 0 only, made before any work begins):

* :class:`Progress`: the round's line on the log (losses and accuracies,
  the test means at evaluated rounds, images/s and seconds);

* ``tensorboard=True``: :class:`TensorBoard`, event files in
  ``<run>/tensorboard`` through ``tensorboardX`` (``pip install -e
  '.[tensorboard]'``; no TensorFlow needed): per round, the fleet's train
  metrics (``train/<metric>``), each cut's (``train/cut<l>/<metric>``, the
  mean over that round's clients at cut l), and at evaluated rounds each
  cut's test ``exit_acc`` and ``full_acc`` (``test/cut<l>/...``) and the
  fleet means (``test/mean_exit_acc``, ``test/mean_full_acc``); the config
  as text. The step is the round (1-based). ``tensorboard --logdir runs/``
  shows every run below it. The event files are as durable as
  ``metrics.jsonl``: each round's events are flushed whole before the next
  round begins, and a run that begins (a resume after a crash included)
  writes its event file anew from the records ``metrics.jsonl`` keeps, so
  the two never disagree.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable, Protocol

from hsee_jax.config import Config
from hsee_jax.rundir import (TENSORBOARD, RunError, WriteError, check_dir, finite_json,
                             injected_fault)
from hsee_jax.strategies import METRIC_NAMES

EVENT_FILES = "events.out.tfevents.*"


class Writer(Protocol):
  """What a run does with its records (the module's docstring)."""

  def begin(self, cfg: Config, records: list[dict]) -> None: ...

  def write_round(self, record: dict) -> None: ...

  def write_event(self, record: dict) -> None: ...

  def close(self) -> None: ...


class MetricsFile:
  """``metrics.jsonl`` (its path from :meth:`hsee_jax.rundir.RunDir.keep_records`,
  which leaves the kept records in it): each round's record and each event
  appended and flushed (only when ``write``: process 0). Of the records it
  keeps only ``last_test``, the newest test metrics, and the run's totals on
  the simulated clock and the link (``sim_seconds``, ``bytes_sent``): a long
  run's memory stays flat."""

  def __init__(self, path: Path, records: list[dict], write: bool):
    self.path = path
    self.last_test = next((r["test"] for r in reversed(records) if "test" in r), None)
    # the run so far on the simulated clock and the link (summary.json)
    self.sim_seconds = sum(r.get("sim_seconds", 0.0) for r in records if "train" in r)
    self.bytes_sent = sum(r.get("bytes_sent", 0) for r in records if "train" in r)
    self.file = open(path, "a") if write else None

  def begin(self, cfg: Config, records: list[dict]) -> None:
    pass  # config.json holds the config, and the file holds the records already

  def write_round(self, record: dict) -> None:
    self._append(record)
    if "test" in record:
      self.last_test = record["test"]
    self.sim_seconds += record.get("sim_seconds", 0.0)
    self.bytes_sent += record.get("bytes_sent", 0)

  def write_event(self, record: dict) -> None:
    self._append(record)

  def _append(self, record: dict) -> None:
    if self.file is None:
      return
    line = finite_json(record) + "\n"
    try:
      injected_fault("metrics", record.get("round", -1) + 1)
      self.file.write(line)
      self.file.flush()
    except OSError as e:
      raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from None

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


class TensorBoard:
  """Per-round scalars and the config in a TensorBoard event file.

  Written synchronously with tensorboardX's own event-file writer and
  protobufs (``EventsWriter``; ``SummaryWriter`` writes from a thread of its
  own, where a full disk would go unseen): each round's events are written
  and flushed to the disk before the next round begins, and a failed write
  is a one-line :class:`hsee_jax.rundir.WriteError` in the run's thread."""

  def __init__(self, logdir: str | Path):
    self.logdir, self.events = Path(logdir), None
    self.where = f"tensorboard: cannot write event files into {self.logdir}"
    check_dir(self.logdir, self.where)

  def begin(self, cfg: Config, records: list[dict]) -> None:
    """A new event file holding the config (as indented JSON text: the Text
    tab) and ``records`` (the rounds ``metrics.jsonl`` keeps); the event
    files of earlier runs in the directory go (``records`` replaces them)."""
    from tensorboardX import summary   # present: Config checks it for tensorboard=True
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    self._summary, self._event_pb2 = summary, event_pb2
    text = json.dumps(cfg.to_dict(), indent=2)
    with self._writing():
      self.logdir.mkdir(parents=True, exist_ok=True)
      for old in self.logdir.glob(EVENT_FILES):
        old.unlink()
      self.events = EventsWriter(str(self.logdir / "events"))
      self._event(0, summary.text("config", "\n".join("    " + line for line in text.splitlines())))
      for record in records:
        self._add(record)
      self.events.flush()

  def write_round(self, record: dict) -> None:
    """Scalars of one round's ``metrics.jsonl`` record, flushed to the event file."""
    with self._writing(record["round"] + 1):
      self._add(record)
      self.events.flush()

  def write_event(self, record: dict) -> None:
    pass  # a stop is in metrics.jsonl; the scalars end at the last round

  @contextlib.contextmanager
  def _writing(self, rnd: int | None = None):
    try:
      injected_fault("tensorboard", rnd)
      yield
    except OSError as e:
      raise WriteError(f"{self.where}: {e.strerror or e}") from None

  def _event(self, step: int, value) -> None:
    self.events.write_event(self._event_pb2.Event(summary=value, step=step, wall_time=time.time()))

  def _scalar(self, tag: str, value, step: int) -> None:
    self._event(step, self._summary.scalar(tag, float(value)))

  def _add(self, record: dict) -> None:
    if "train" not in record:  # a stop event
      return
    step = record["round"] + 1
    for k, v in record["train"].items():
      self._scalar(f"train/{k}", v, step)
    for k in ("sim_seconds", "bytes_sent"):  # the simulated clock and the link (costs.Clock)
      if k in record:
        self._scalar(f"clock/{k}", record[k], step)
    for what in ("dropped", "unused"):   # missed the deadline; in time but not needed
      for cut, n in record.get(f"{what}_per_cut", {}).items():
        self._scalar(f"{what}/cut{cut}", n, step)
    by_cut: dict[int, list[dict]] = {}
    for c in record.get("train_per_client", []):
      by_cut.setdefault(c["cut"], []).append(c)
    for cut, clients in sorted(by_cut.items()):
      for k in METRIC_NAMES:
        self._scalar(f"train/cut{cut}/{k}", sum(c[k] for c in clients) / len(clients), step)
    test = record.get("test")
    if test:
      for c in test["cuts"]:
        for k in ("exit_acc", "full_acc"):
          self._scalar(f"test/cut{c['cut']}/{k}", c[k]["mean"], step)
      for k in ("mean_exit_acc", "mean_full_acc"):
        self._scalar(f"test/{k}", test[k], step)
    self._scalar("speed/images_per_s", record["images_per_s"], step)

  def close(self) -> None:
    """Flush and close the event file (a failure here was reported by the round's flush)."""
    if self.events is not None:
      with contextlib.suppress(OSError):
        self.events.close()
      self.events = None


def format_metrics(record: dict) -> str:
  """The train metrics of a round's record, or why nobody trained: every
  sampled client missed the deadline, or nobody was online."""
  m = record["train"]
  if m:
    return "  ".join(f"{k} {m[k]:.3f}" for k in METRIC_NAMES)
  if sum(record.get("dropped_per_cut", {}).values()):
    return "no client made the deadline"
  return "nobody online"


class Progress:
  """Each round's line on ``log``."""

  def __init__(self, rounds: int, log: Callable[[str], None] = print):
    self.rounds, self.log = rounds, log

  def begin(self, cfg: Config, records: list[dict]) -> None:
    pass  # the run's header lines say what it trains

  def write_round(self, record: dict) -> None:
    line = f"round {record['round'] + 1:>3}/{self.rounds}  train {format_metrics(record)}"
    if "test" in record:
      line += (f" | test mean_exit_acc {record['test']['mean_exit_acc']:.3f} "
               f"mean_full_acc {record['test']['mean_full_acc']:.3f}")
    self.log(line + f" | {record['images_per_s']:.0f} img/s {record['seconds']:.1f}s")

  def write_event(self, record: dict) -> None:
    pass  # the run's log line says why it stopped

  def close(self) -> None:
    pass


def for_config(cfg: Config, out: Path, log: Callable[[str], None] = print) -> list:
  """The writers ``cfg`` asks for, for a run in ``out``: the progress line,
  and TensorBoard with ``tensorboard=True``. A one-line RunError where one
  cannot write."""
  return [Progress(cfg.rounds, log)] + ([TensorBoard(Path(out) / TENSORBOARD)]
                                        if cfg.tensorboard else [])
