"""Metric writers: what a run does with each round's record besides ``metrics.jsonl``.

A writer has ``write_config(cfg)``, ``write_round(record)`` (the record
``metrics.jsonl`` gets, after it got it) and ``close()``; the training loop
calls the run's writers in order (process 0 only). :func:`for_config`
gives a run's writers from its config:

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


def for_config(cfg: Config, out: Path) -> list:
  """The writers ``cfg`` asks for, for a run in ``out``."""
  return [TensorBoard(Path(out) / TENSORBOARD_DIR)] if cfg.tensorboard else []
