"""The Hetero-SplitEE client update (PAPER.md, "Training"), per minibatch:

* client: ``loss_c = CE(exit_head(client_part(x)), y)`` updates client part + exit head;
* server: ``loss_s = CE(server_part(stop_gradient(h)), y)``, ``h = client_part(x)``,
  updates server part + classifier.

Both come from one ``value_and_grad`` of ``w * loss_c + loss_s`` (w =
exit_loss_weight) over (client, server) parameters: ``loss_c`` does not touch
the server, and the ``stop_gradient`` keeps ``loss_s`` out of the client
unless ``server_grad_to_client`` (classical split learning) is set.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hsee_jax import data as data_lib
from hsee_jax import models, optim
from hsee_jax.engine import ClientUpdate
from hsee_jax.optim import apply_gradients

METRIC_NAMES = ("exit_loss", "full_loss", "exit_acc", "full_acc")


@dataclasses.dataclass(frozen=True)
class TrainSet:
  """The training set on the device, what every client update reads (the
  ``shared`` input of :class:`hsee_jax.engine.ClientUpdate`): uint8 images
  [N, H, W, C], labels [N] and the per-channel normalisation ``mean`` and
  ``std`` [C]. A client's minibatch is a set of indices into it."""
  images: Any
  labels: Any
  mean: Any
  std: Any


jax.tree_util.register_dataclass(TrainSet, data_fields=["images", "labels", "mean", "std"],
                                 meta_fields=[])


def put_train_set(dataset: data_lib.Dataset) -> TrainSet:
  """``dataset``'s training images, labels and normalisation on the device."""
  return TrainSet(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels),
                  jnp.asarray(np.asarray(dataset.mean)), jnp.asarray(np.asarray(dataset.std)))


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels: the default split-update loss."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def preprocessing(augment: bool = True, augment_pad: float = 0.125) -> Callable:
  """The default input preprocessing, ``(key, uint8 images [B, H, W, 3], mean, std)
  -> float images``: a random crop of the padded image and a horizontal flip
  (if ``augment``; ``augment_pad`` is the padding as a share of the side),
  then per-channel normalisation."""
  def preprocess(key, images, mean, std):
    if augment:
      images = data_lib.augment(key, images, augment_pad)
    return data_lib.normalize(images, mean, std)
  return preprocess


def split_update(net: models.SplitNetwork, cut: int, *, loss: Callable = cross_entropy,
                 preprocess: Callable | None = None, optimizer: str = "sgd",
                 nesterov: bool = False, server_grad_to_client: bool = False) -> ClientUpdate:
  """The Hetero-SplitEE client update for a client at ``cut``, as FedJAX's
  init / step / final (:class:`hsee_jax.engine.ClientUpdate`).

  Each step: the client part and its exit head give ``exit_loss`` (on the
  exit logits), the server part given the client part's activations gives
  ``full_loss``; one ``value_and_grad`` of ``w * exit_loss +
  full_loss`` (w = the exit-loss weight) updates both parts; no gradient
  reaches the client part from the server unless ``server_grad_to_client``.

  Args:
    net: the split network; ``cut`` one of its ``allowed_cuts()``.
    loss: ``(logits, labels) -> scalar``, for both the exit and the final
      logits (default: :func:`cross_entropy`).
    preprocess: ``(key, images, mean, std) -> images`` (default:
      :func:`preprocessing` with augmentation).
    optimizer, nesterov: ``sgd`` | ``adam`` and SGD's Nesterov flag
      (:func:`hsee_jax.optim.direction`).

  The input every client reads is a :class:`TrainSet`; the state is
  ``(client PartState, server PartState, PRNG key)``; the per-step input
  ``(indices [B], hparams [4])``: indices into the train set and the
  learning rate, momentum, weight decay and exit-loss weight
  (``fleet.HPARAMS``). The output is ``((client, server), metrics [4])``, the
  metrics (``METRIC_NAMES``) averaged over the steps.
  """
  preprocess = preprocessing() if preprocess is None else preprocess

  def init(train_set, state):
    client, server, key = state
    return client, server, key, jnp.zeros(len(METRIC_NAMES)), jnp.zeros(())

  def step(train_set, carry, x):
    client, server, key, msum, n = carry
    idx, hp = x
    lr, momentum, weight_decay, exit_weight = hp[0], hp[1], hp[2], hp[3]
    step_tx = optim.direction(optimizer, nesterov, momentum, weight_decay)
    key, aug_key = jax.random.split(key)
    labels = train_set.labels[idx]
    images = preprocess(aug_key, train_set.images[idx], train_set.mean, train_set.std)

    def loss_fn(client_params, server_params):
      (exit_logits,), logits, (c_stats,), s_stats = net.split_forward(
          [(client_params, client.batch_stats)], (server_params, server.batch_stats), images,
          [cut], train=True, server_grad_to_client=server_grad_to_client)
      loss_c, loss_s = loss(exit_logits, labels), loss(logits, labels)
      metrics = jnp.stack([loss_c, loss_s, _accuracy(exit_logits, labels),
                           _accuracy(logits, labels)])
      return exit_weight * loss_c + loss_s, (metrics, c_stats, s_stats)

    (_, (metrics, c_stats, s_stats)), (g_client, g_server) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(client.params, server.params)
    client = apply_gradients(step_tx, client, g_client, lr, c_stats)
    server = apply_gradients(step_tx, server, g_server, lr, s_stats)
    return client, server, key, msum + metrics, n + 1

  def final(train_set, carry):
    client, server, _, msum, n = carry
    return (client, server), msum / n

  return ClientUpdate(init, step, final)
