"""The Hetero-SplitEE client update (PAPER.md, "Training"), per minibatch:

* client: ``loss_c = CE(exit_head(client_part(x)), y)`` updates client part + exit head;
* server: ``loss_s = CE(server_part(stop_gradient(h)), y)``, ``h = client_part(x)``,
  updates server part + classifier.

Both come from one ``value_and_grad`` of ``w * loss_c + loss_s`` (w =
exit_loss_weight) over (client, server) parameters: ``loss_c`` does not touch
the server, and the ``stop_gradient`` keeps ``loss_s`` out of the client
unless ``server_grad_to_client`` (classical split learning) is set.

``w * loss_c`` is the default *client objective* (:func:`exit_objective`);
a variant (:mod:`hsee_jax.variants`) changes it, adds exits (``exit_cuts``)
or adds a term on the weights (``step_penalty``); none is named here.
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
from hsee_jax.fleet import HPARAMS
from hsee_jax.optim import apply_gradients

METRIC_NAMES = ("exit_loss", "full_loss", "exit_acc", "full_acc")


@dataclasses.dataclass(frozen=True)
class TrainSet:
  """The training set on the device, what every client update reads (the
  ``common`` input of :class:`hsee_jax.engine.ClientUpdate`): uint8 images
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


def _mean(values: list):
  return values[0] if len(values) == 1 else sum(values) / len(values)


def exit_objective(loss: Callable = cross_entropy) -> Callable:
  """The paper's client objective, ``(exits, final, labels, hp) -> scalar``:
  ``hp["exit_loss_weight"]`` times the mean of ``loss`` over the client's
  exits (PAPER.md's exit loss for one exit; DepthFL's mean for several).

  ``exits``: the client's exit logits, shallowest first, its own cut's last;
  ``final``: the server part's logits for the same images, held fixed
  (forward information; no gradient reaches the server or comes from it);
  ``hp``: the step's hyperparameters by name (``fleet.HPARAMS`` and the
  variants' own). A variant's ``objective`` has the same signature.
  """
  def objective(exits, final, labels, hp):
    return hp["exit_loss_weight"] * _mean([loss(e, labels) for e in exits])
  return objective


def _exit_views(params: dict, stats: dict, exit_cuts: tuple) -> list:
  """The client part as one (params, batch_stats) per exit for
  ``SplitNetwork.split_forward``: at each lower cut its head there as ``EXIT_HEAD``."""
  views = []
  for c in exit_cuts:
    name = models.exit_head_at(c)
    views.append(({**params, models.EXIT_HEAD: params[name]},
                  {**stats, models.EXIT_HEAD: stats[name]} if name in stats else stats))
  return views + [(params, stats)]


def _merge_exit_stats(stats_per_exit: list, exit_cuts: tuple) -> dict:
  """The client part's new batch statistics from ``split_forward``'s per-exit
  ones: each unit from the span that ran it, each lower head under its name."""
  new, first = dict(stats_per_exit[-1]), 1
  for c, stats in zip(exit_cuts, stats_per_exit):
    for k in range(first, c + 1):
      if models.unit_name(k) in stats:
        new[models.unit_name(k)] = stats[models.unit_name(k)]
    if models.EXIT_HEAD in stats:
      new[models.exit_head_at(c)] = stats[models.EXIT_HEAD]
    first = c + 1
  return new


def split_update(net: models.SplitNetwork, cut: int, *, loss: Callable = cross_entropy,
                 objective: Callable | None = None, exit_cuts: tuple = (),
                 preprocess: Callable | None = None, optimizer: str = "sgd",
                 nesterov: bool = False, server_grad_to_client: bool = False,
                 link=None, step_penalty: Callable | None = None,
                 hparams: tuple = HPARAMS) -> ClientUpdate:
  """The Hetero-SplitEE client update for a client at ``cut``, as FedJAX's
  init / step / final (:class:`hsee_jax.engine.ClientUpdate`).

  Each step: the client part and its exit heads give the client objective,
  the server part given the client part's activations gives ``full_loss``;
  one ``value_and_grad`` of ``objective + full_loss`` updates both parts;
  no gradient reaches the client part from the server unless
  ``server_grad_to_client``.

  Args:
    net: the split network; ``cut`` one of its ``allowed_cuts()``.
    loss: ``(logits, labels) -> scalar``, for the exits and the final
      logits (default: :func:`cross_entropy`).
    objective: the client objective ``(exits, final, labels, hp) -> scalar``,
      ``hp`` the step's hyperparameters by name (default:
      :func:`exit_objective` of ``loss``: the exit-loss weight times the
      exit's loss, PAPER.md's).
    exit_cuts: cuts below ``cut`` where the client also has an exit head
      (a variant's ``exits``; the client part's params hold them as
      ``models.exit_head_at(c)``).
    preprocess: ``(key, images, mean, std) -> images`` (default:
      :func:`preprocessing` with augmentation).
    optimizer, nesterov: ``sgd`` | ``adam`` and SGD's Nesterov flag
      (:func:`hsee_jax.optim.direction`).
    link: what the server part receives of the activations
      (:class:`hsee_jax.link.Link`; None: the activations as computed).
    step_penalty: ``(params, start, hp) -> scalar``, added each step
      (a variant's): ``params`` the (client part, server part) parameters,
      ``start`` those the client began the update with (None: no term, and
      no copy of them in the carry).
    hparams: the names of the per-step hyperparameters' columns
      (``fleet.HPARAMS``, then the variants' own), given to the objective
      and the penalties by name.

  The input every client reads is a :class:`TrainSet`; the state is
  ``(client PartState, server PartState, PRNG key)``; the per-step input
  ``(indices [B], hparams [H])``: indices into the train set and the
  hyperparameters ``hparams`` names (learning rate, momentum, weight decay,
  exit-loss weight, then the variants'); one more column, where present,
  says whether the client does the step (participation=partial). The output is ``((client, server), metrics
  [4])``, the metrics (``METRIC_NAMES``; the exit's at ``cut``) averaged
  over the steps.
  """
  preprocess = preprocessing() if preprocess is None else preprocess
  objective = exit_objective(loss) if objective is None else objective
  exit_cuts = tuple(exit_cuts)
  if any(c >= cut for c in exit_cuts) or list(exit_cuts) != sorted(set(exit_cuts)):
    raise ValueError(f"exit_cuts: increasing cuts below {cut}, got {exit_cuts}")

  def init(train_set, state):
    client, server, key = state
    carry = client, server, key, jnp.zeros(len(METRIC_NAMES)), jnp.zeros(())
    return carry + ((client.params, server.params),) if step_penalty is not None else carry

  def step(train_set, carry, x):
    (client, server, key, msum, n), anchor = carry[:5], carry[5:]
    idx, hp = x
    lr, momentum, weight_decay = hp[0], hp[1], hp[2]
    step_tx = optim.direction(optimizer, nesterov, momentum, weight_decay)
    key, aug_key = jax.random.split(key)
    labels = train_set.labels[idx]
    images = preprocess(aug_key, train_set.images[idx], train_set.mean, train_set.std)

    def loss_fn(client_params, server_params):
      exits, logits, c_stats, s_stats = net.split_forward(
          _exit_views(client_params, client.batch_stats, exit_cuts),
          (server_params, server.batch_stats), images, exit_cuts + (cut,), train=True,
          server_grad_to_client=server_grad_to_client, link=link)
      loss_s = loss(logits, labels)
      metrics = jnp.stack([loss(exits[-1], labels), loss_s, _accuracy(exits[-1], labels),
                           _accuracy(logits, labels)])
      named = {h: hp[i] for i, h in enumerate(hparams)}
      total = objective(exits, jax.lax.stop_gradient(logits), labels, named) + loss_s
      if step_penalty is not None:
        total = total + step_penalty((client_params, server_params), anchor[0], named)
      return total, (metrics, _merge_exit_stats(c_stats, exit_cuts), s_stats)

    (_, (metrics, c_stats, s_stats)), (g_client, g_server) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(client.params, server.params)
    new_client = apply_gradients(step_tx, client, g_client, lr, c_stats)
    new_server = apply_gradients(step_tx, server, g_server, lr, s_stats)
    if hp.shape[-1] > len(hparams):  # participation=partial: a step past the client's budget
      on = hp[len(hparams)] > 0      # changes nothing (the column exists only then)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(on, a, b), new, old)
      return (keep(new_client, client), keep(new_server, server), key,
              msum + on * metrics, n + on) + anchor
    return (new_client, new_server, key, msum + metrics, n + 1) + anchor

  def final(train_set, carry):
    client, server, _, msum, n = carry[:5]
    return (client, server), msum / n

  return ClientUpdate(init, step, final)
