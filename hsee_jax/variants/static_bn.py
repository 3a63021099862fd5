"""HeteroFL's static batch normalisation ([choice], ``static_bn=True``; Diao et
al., ICLR 2021): the batch statistics of an evaluated network are
recomputed over the training data with its averaged weights, instead of
being the average of the clients' running statistics.

The network runs in training mode over :data:`BATCHES` batches of
:data:`BATCH_SIZE` training images (a seeded order, no augmentation), each
feeding the running averages (momentum 0.9: what the averaged statistics
leave weighs 0.9**40 < 2%). Training is untouched: only what is evaluated
changes. The cost, :data:`BATCHES` x :data:`BATCH_SIZE` forward passes of
the network per evaluated network, is :data:`IMAGES` x ``costs.forward_flops``.
A variant with one hook, ``evaluated`` (Averaging).
"""
from __future__ import annotations

import jax
import numpy as np

from hsee_jax import data as data_lib
from hsee_jax import models
from hsee_jax.optim import PartState
from hsee_jax.strategies.algorithm import cached_program
from hsee_jax.strategies.update import TrainSet
from hsee_jax.variants.base import Variant

BATCHES = 40
BATCH_SIZE = 250
IMAGES = BATCHES * BATCH_SIZE  # forward passes per recomputation (costs.forward_flops each)


def _program(net: models.SplitNetwork):
  @jax.jit
  def run(params, stats, train_set, indices):
    def body(stats, idx):
      x = data_lib.normalize(train_set.images[idx], train_set.mean, train_set.std)
      return net.apply_span(params, stats, x, *net.full_span(), train=True)[2], None
    return jax.lax.scan(body, stats, indices)[0]
  return run


def batch_indices(num_images: int, seed: int) -> np.ndarray:
  """[BATCHES, B] indices of the training images the statistics are computed on."""
  b = min(BATCH_SIZE, num_images)
  order = np.random.default_rng([seed, 29]).permutation(num_images)
  return np.take(order, np.arange(BATCHES * b), mode="wrap").reshape(BATCHES, b).astype(np.int32)


def recompute(net: models.SplitNetwork, network: PartState, train_set: TrainSet,
              seed: int) -> PartState:
  """``network`` (every unit and the classifier, a whole network) with its
  units' batch statistics recomputed over ``train_set``."""
  run = cached_program(("static_bn", net), lambda: _program(net))
  stats = run(network.params, network.batch_stats, train_set,
              batch_indices(int(train_set.labels.shape[0]), seed))
  return network.replace(batch_stats=stats)


def _evaluated(net, network: PartState, train_set: TrainSet, seed: int) -> PartState:
  return recompute(net, network, train_set, seed)


VARIANT = Variant(name="static-bn", evaluated=_evaluated)


def from_config(cfg) -> Variant | None:
  return VARIANT if cfg.static_bn else None
