"""Metric writers: what a run does with each round's record.

A writer has ``write_config(cfg)``, ``write_round(record)`` and ``close()``;
:func:`hsee_jax.train.run_rounds` calls the run's writers in order after
each round. A run's writers are :class:`hsee_jax.rundir.MetricsFile` (the
record appended to ``metrics.jsonl``, first: what a resume trusts), then
those of :func:`for_config` (process 0 only):

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
  shows every run below it; a resumed run appends a new event file, and the
  rounds it recomputes appear again at the same steps.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from hsee_jax.config import Config
from hsee_jax.strategies import METRIC_NAMES

TENSORBOARD_DIR = "tensorboard"


class TensorBoard:
  """Per-round scalars and the config, written by ``tensorboardX.SummaryWriter``."""

  def __init__(self, logdir: str | Path):
    from tensorboardX import SummaryWriter  # present: Config checks it for tensorboard=True
    self.writer = SummaryWriter(str(logdir))

  def write_config(self, cfg: Config) -> None:
    """The run's config, as indented JSON text (TensorBoard's Text tab)."""
    text = json.dumps(cfg.to_dict(), indent=2)
    self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

  def write_round(self, record: dict) -> None:
    """Scalars of one round's ``metrics.jsonl`` record (stop events are skipped)."""
    if "train" not in record:
      return
    step = record["round"] + 1
    for k, v in record["train"].items():
      self.writer.add_scalar(f"train/{k}", v, step)
    by_cut: dict[int, list[dict]] = {}
    for c in record.get("train_per_client", []):
      by_cut.setdefault(c["cut"], []).append(c)
    for cut, clients in sorted(by_cut.items()):
      for k in METRIC_NAMES:
        self.writer.add_scalar(f"train/cut{cut}/{k}", sum(c[k] for c in clients) / len(clients),
                               step)
    test = record.get("test")
    if test:
      for c in test["cuts"]:
        for k in ("exit_acc", "full_acc"):
          self.writer.add_scalar(f"test/cut{c['cut']}/{k}", c[k]["mean"], step)
      for k in ("mean_exit_acc", "mean_full_acc"):
        self.writer.add_scalar(f"test/{k}", test[k], step)
    self.writer.add_scalar("speed/images_per_s", record["images_per_s"], step)

  def close(self) -> None:
    """Flush and close the event file."""
    self.writer.close()


def format_metrics(m: dict) -> str:
  return "  ".join(f"{k} {m[k]:.3f}" for k in METRIC_NAMES)


class Progress:
  """Each round's line on ``log``."""

  def __init__(self, rounds: int, log: Callable[[str], None] = print):
    self.rounds, self.log = rounds, log

  def write_config(self, cfg: Config) -> None:
    pass  # the run's header lines say what it trains

  def write_round(self, record: dict) -> None:
    line = f"round {record['round'] + 1:>3}/{self.rounds}  train {format_metrics(record['train'])}"
    if "test" in record:
      line += (f" | test mean_exit_acc {record['test']['mean_exit_acc']:.3f} "
               f"mean_full_acc {record['test']['mean_full_acc']:.3f}")
    self.log(line + f" | {record['images_per_s']:.0f} img/s {record['seconds']:.1f}s")

  def close(self) -> None:
    pass


def for_config(cfg: Config, out: Path, log: Callable[[str], None] = print) -> list:
  """The writers ``cfg`` asks for, for a run in ``out``: the progress line,
  and TensorBoard with ``tensorboard=True``."""
  return [Progress(cfg.rounds, log)] + ([TensorBoard(Path(out) / TENSORBOARD_DIR)]
                                        if cfg.tensorboard else [])
