"""A training run: build everything from a Config, train for cfg.rounds rounds,
evaluate, and write ``config.json``, ``metrics.jsonl`` and ``summary.json``."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from hsee_jax import data as data_lib
from hsee_jax import evaluation, models, optim
from hsee_jax.config import Config
from hsee_jax.strategies import METRIC_NAMES, Strategy


class RunError(RuntimeError):
  """A run that cannot go on; the message is one line naming the problem."""


def build(cfg: Config, dataset: data_lib.Dataset | None = None) -> tuple[data_lib.Dataset, Strategy]:
  """Dataset, partitions, network, optimiser and strategy for a config."""
  dataset = dataset if dataset is not None else data_lib.load_dataset(cfg)
  partitions = data_lib.partition(dataset.train_labels, cfg.num_clients, cfg.partition,
                                  cfg.dirichlet_alpha, cfg.seed)
  steps = cfg.local_steps or max(1, math.ceil(np.mean([len(p) for p in partitions]) / cfg.batch_size))
  net = models.SplitResNet18(dataset.num_classes, cfg.width, cfg.exit_head)
  tx = optim.make_optimizer(cfg)
  schedule = optim.make_schedule(cfg, cfg.rounds * steps)
  return dataset, Strategy(cfg, net, tx, dataset, partitions, steps, schedule)


def _format_round(rec: dict, rounds: int) -> str:
  m = rec["train"]
  line = (f"round {rec['round'] + 1:>3}/{rounds}  loss client {m['loss_client']:.3f} "
          f"server {m['loss_server']:.3f}  train acc client {m['acc_client']:.3f} "
          f"server {m['acc_server']:.3f}")
  if "test" in rec:
    line += (f" | test exit {rec['test']['mean_exit_acc']:.3f} "
             f"server {rec['test']['mean_server_acc']:.3f}")
  return line + f" | {rec['images_per_s']:.0f} img/s {rec['seconds']:.1f}s"


def _check_finite(metrics: np.ndarray, rnd: int, cuts) -> None:
  bad = ~np.isfinite(metrics)
  if bad.any():
    client, col = map(int, np.argwhere(bad)[0])
    raise RunError(f"round {rnd + 1}: non-finite {METRIC_NAMES[col]} "
                   f"({metrics[client, col]}) on client {client} (cut {cuts[client]})")


def train(cfg: Config, out_dir: str | Path, *, overwrite: bool = False,
          log: Callable[[str], None] = print, dataset: data_lib.Dataset | None = None) -> dict:
  out = Path(out_dir)
  if (out / "metrics.jsonl").exists() and not overwrite:
    raise RunError(f"output directory {out} already holds a run; pass --overwrite to replace it")
  out.mkdir(parents=True, exist_ok=True)
  (out / "metrics.jsonl").unlink(missing_ok=True)
  (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

  t_start = time.time()
  dataset, strategy = build(cfg, dataset)
  log(f"[hsee] {cfg.name}: {cfg.strategy}, {cfg.num_clients} clients, cuts {list(cfg.cuts)}, "
      f"{dataset.name} {len(dataset.train_labels)} train / {len(dataset.test_labels)} test, "
      f"width {cfg.width}, {strategy.local_steps} local steps x batch {cfg.batch_size}, "
      f"mode {strategy.runners[cfg.cuts[0]].mode}, backend {jax.default_backend()}")
  init_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
  state = strategy.init_state(init_key)
  images_per_round = cfg.num_clients * strategy.local_steps * cfg.batch_size
  test = None
  with open(out / "metrics.jsonl", "a") as mfile:
    for rnd in range(cfg.rounds):
      t0 = time.time()
      state, metrics = strategy.run_round(state, rnd, train_key)
      jax.block_until_ready(state)
      seconds = time.time() - t0
      try:
        _check_finite(metrics, rnd, cfg.cuts)
      except RunError as e:
        mfile.write(json.dumps({"round": rnd, "event": "stopped", "error": str(e)}) + "\n")
        raise
      rec = {"round": rnd, "seconds": seconds, "images_per_s": images_per_round / seconds,
             "train": dict(zip(METRIC_NAMES, map(float, metrics.mean(0)))),
             "train_per_client": [dict(zip(METRIC_NAMES, map(float, m))) for m in metrics]}
      if (rnd + 1) % cfg.eval_every == 0 or rnd + 1 == cfg.rounds:
        test = evaluation.evaluate(strategy, state, dataset, cfg.exit_thresholds,
                                   cfg.eval_batch_size)
        rec["test"] = test
      mfile.write(json.dumps(rec) + "\n")
      mfile.flush()
      log(_format_round(rec, cfg.rounds))

  summary = {"config": cfg.to_dict(), "rounds": cfg.rounds, "local_steps": strategy.local_steps,
             "wall_seconds": time.time() - t_start, "backend": jax.default_backend(),
             "test": test}
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  for c in test["clients"]:
    log(f"[hsee] client {c['client']} (cut {c['cut']}): exit acc {c['exit_acc']:.4f}, "
        f"server acc {c['server_acc']:.4f}")
  log(f"[hsee] done in {summary['wall_seconds']:.1f}s; results in {out}")
  return summary
