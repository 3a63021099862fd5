"""Test-set evaluation: exit-head and full-path accuracy, entropy early exit.

For every client: the accuracy of its exit head alone, of its full path
(client part, then the server part its activations go to), and, for each
threshold tau, the accuracy when a sample stops at the exit head if the
normalised entropy of its softmax is below tau and goes to the server
otherwise, with the share of samples answered on the client. tau = 0 is
"always server", tau = 1 "always client" (PAPER.md, [choice]).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax import data as data_lib
from hsee_jax import models


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
  """Entropy of softmax(logits) / log(num_classes), in [0, 1]."""
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ent = -(np.exp(logp) * logp).sum(-1)
  return np.clip(ent / np.log(logits.shape[-1]), 0.0, 1.0)


def early_exit_table(exit_logits, server_logits, labels, thresholds) -> list[dict]:
  """The entropy early exit, as a table over thresholds.

  Args:
    exit_logits, server_logits: [N, classes] logits of the exit head and of
      the full path (client part then server part) for the same N samples.
    labels: [N] integer labels.
    thresholds: the taus; a sample stops at the exit when the normalised
      entropy of its softmax is below tau (tau >= 1: every sample stops).
  Returns:
    One dict per threshold: ``threshold``, ``accuracy`` (exited samples
    judged by the exit, the others by the full path), ``client_fraction``
    (the share that stopped at the exit).
  """
  ent = normalized_entropy(np.asarray(exit_logits, np.float64))
  exit_ok = np.argmax(exit_logits, -1) == labels
  server_ok = np.argmax(server_logits, -1) == labels
  rows = []
  for tau in thresholds:
    stop = (ent < tau) | (tau >= 1.0)
    rows.append({"threshold": float(tau),
                 "accuracy": float(np.mean(np.where(stop, exit_ok, server_ok))),
                 "client_fraction": float(np.mean(stop))})
  return rows


@functools.lru_cache(maxsize=None)
def _logits_fn(net: models.SplitNetwork, cuts: tuple, link):
  """Images -> (exit logits at each of ``cuts``, full-path logits), one
  forward pass (:meth:`hsee_jax.models.SplitNetwork.split_forward`)."""
  @jax.jit
  def fn(clients, server, images, mean, std):
    exits, logits, _, _ = net.split_forward(
        [(c.params, c.batch_stats) for c in clients], (server.params, server.batch_stats),
        data_lib.normalize(images, mean, std), cuts, train=False, link=link)
    return tuple(exits), logits
  return fn


def path_logits(net, cuts, clients, server, images, mean, std, batch_size, link=None):
  """([exit logits at each of ``cuts``], full-path logits) over ``images``,
  in fixed-size batches (the last one padded, so one compilation serves every
  batch). ``clients[i]`` is the client part at ``cuts[i]``, ``server`` the
  server part after the last cut; with several cuts they are one whole
  network split at those cuts (:meth:`~hsee_jax.models.SplitNetwork.split_forward`).
  ``link``: what the server part receives (:class:`hsee_jax.link.Link`; None: the activations)."""
  fn = _logits_fn(net, tuple(cuts), link)
  n = len(images)
  outs_e, outs_s = [], []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    e, s = fn(tuple(clients), server, jnp.asarray(chunk), mean, std)
    outs_e.append([np.asarray(x)[:batch_size - pad] for x in e])
    outs_s.append(np.asarray(s)[:batch_size - pad])
  return [np.concatenate(x) for x in zip(*outs_e)], np.concatenate(outs_s)


def evaluate(net: models.SplitNetwork, fleet, evaluated: list, dataset: data_lib.Dataset,
             thresholds, batch_size: int, link=None) -> dict:
  """Test metrics of the fleet (a :class:`hsee_jax.fleet.Fleet`).

  Runs every model in ``evaluated``, the strategy's
  ``Algorithm.eval_models(state)`` (``strategies.EvalModel``): after an
  Averaging aggregation the clients of every cut hold one whole network,
  evaluated in one forward pass that yields every cut's exit on the way to
  the full path; where clients differ (Sequential client parts,
  Averaging between aggregations) a seeded sample of ``eval_clients`` clients
  per cut (all by default). Returns per-cut summaries (``cuts``: mean, min and
  max over the evaluated clients, the mean early-exit table), per-client rows
  for clients evaluated one by one (``clients``), and the means over all
  clients of the fleet (a client not evaluated counts as its cut's mean).
  ``link``: what the server part receives (:class:`hsee_jax.link.Link`;
  None: the activations); a lossy link is crossed at each client's own cut,
  so each cut's full path is then a forward pass of its own.
  """
  labels = dataset.test_labels
  mean, std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
  batch_size = min(batch_size, len(labels))
  logits = {}
  # one whole network: every exit and the full path in one pass, unless a
  # lossy link is crossed at each cut (then each model is a pass of its own)
  one_pass = lambda m: m.one_network and link is None
  whole_net = sorted((m for m in evaluated if one_pass(m)), key=lambda m: m.cut)
  if whole_net:
    exits, whole = path_logits(net, [m.cut for m in whole_net], [m.client for m in whole_net],
                               whole_net[-1].server, dataset.test_images, mean, std, batch_size)
    logits.update({id(m): (e, whole) for m, e in zip(whole_net, exits)})
  for m in evaluated:
    if not one_pass(m):
      (e,), s = path_logits(net, [m.cut], [m.client], m.server, dataset.test_images,
                            mean, std, batch_size, link)
      logits[id(m)] = (e, s)
  rows = []
  for m in evaluated:
    e_logits, s_logits = logits[id(m)]
    rows.append((m, {
        "client": None if m.one_network else m.clients[0], "cut": m.cut,
        "exit_acc": float(np.mean(np.argmax(e_logits, -1) == labels)),
        "full_acc": float(np.mean(np.argmax(s_logits, -1) == labels)),
        "early_exit": early_exit_table(e_logits, s_logits, labels, thresholds),
    }))
  per_client = {"exit_acc": np.full(fleet.num_clients, np.nan), "full_acc": np.full(fleet.num_clients, np.nan)}
  cuts = []
  for cut, ids in fleet.groups.items():
    mine = [(m, r) for m, r in rows if m.cut == cut]
    one_model = any(m.one_network for m, _ in mine)
    summary = {"cut": cut, "clients": int(len(ids)),
               "evaluated": "one model shared by every client of the cut" if one_model
               else len(mine)}
    for metric in ("exit_acc", "full_acc"):
      vals = np.array([r[metric] for _, r in mine])
      summary[metric] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)),
                         "max": float(np.max(vals))}
      per_client[metric][ids] = np.mean(vals)
      for m, r in mine:
        per_client[metric][list(m.clients)] = r[metric]
    summary["early_exit"] = [
        {"threshold": t["threshold"],
         "accuracy": float(np.mean([r["early_exit"][j]["accuracy"] for _, r in mine])),
         "client_fraction": float(np.mean([r["early_exit"][j]["client_fraction"] for _, r in mine]))}
        for j, t in enumerate(mine[0][1]["early_exit"])]
    cuts.append(summary)
  return {
      "cuts": cuts,
      "clients": [r for m, r in rows if not m.one_network],
      "mean_exit_acc": float(np.mean(per_client["exit_acc"])),
      "mean_full_acc": float(np.mean(per_client["full_acc"])),
  }


def format_cut(c: dict) -> str:
  """One line per cut: how many clients, what was evaluated, the accuracies."""
  ev = "shared model" if isinstance(c["evaluated"], str) else f"{c['evaluated']} evaluated"
  spread = lambda d: (f"{d['mean']:.4f}" if d["min"] == d["max"]
                      else f"{d['mean']:.4f} (min {d['min']:.4f}, max {d['max']:.4f})")
  clients = f"{c['clients']} client{'s' if c['clients'] != 1 else ''}"
  return (f"cut {c['cut']} ({clients}, {ev}): exit_acc {spread(c['exit_acc'])}, "
          f"full_acc {spread(c['full_acc'])}")


def format_table(test: dict) -> str:
  """Per-cut accuracies and the early-exit table as aligned text."""
  lines = [format_cut(c) for c in test["cuts"]]
  lines.append("early exit (per cut: accuracy / share answered at the client)")
  taus = [r["threshold"] for r in test["cuts"][0]["early_exit"]]
  lines.append("   tau " + " ".join(f"{'cut ' + str(c['cut']):>14}" for c in test["cuts"]))
  for j, tau in enumerate(taus):
    cells = [f"{c['early_exit'][j]['accuracy']:.3f} / {c['early_exit'][j]['client_fraction']:.2f}"
             for c in test["cuts"]]
    lines.append(f"{tau:6.2f} " + " ".join(f"{x:>14}" for x in cells))
  return "\n".join(lines)
