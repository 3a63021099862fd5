"""ResNet-18 (CIFAR form) as an ordered list of units that a cut layer splits.

Unit 1 is the stem (3x3 conv, BN, ReLU; no max-pool), units 2..9 are the eight
BasicBlocks (four stages of two, 64/128/256/512 channels times ``width``).
A cut ``l`` gives a *client part* (units 1..l) that ends in an *exit head*,
and a *server part* (units l+1..9) that ends in the final classifier.

Parameters and batch statistics live in flat dicts keyed by ``unit_<k>``,
``exit_head`` and ``classifier``, so unit k is the same subtree in every
client and server model that holds it; that is what cross-layer aggregation
matches on. All functions are pure: variables in, outputs and new batch
statistics out, PRNG keys passed explicitly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hsee_jax.config import NUM_UNITS

Params = dict[str, Any]

EXIT_HEAD = "exit_head"
CLASSIFIER = "classifier"

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def unit_name(k: int) -> str:
  return f"unit_{k}"


def materialize(x):
  """``x``, computed once: XLA:CPU may not fuse it into, and recompute it in, each consumer.

  XLA:CPU's fusion copies cheap elementwise producers into every consumer. A
  unit's output ends a batch-norm / ReLU / residual chain that reaches back
  through every earlier unit, and the backward pass transposes it for the
  kernel-gradient convolution: that transpose fusion recomputed the chain of
  units 1..k (``experiments/profile_step.py``, width 0.25: 26 ms of layout
  thunk time per step, 16 ms with this; ``experiments/ab_cpu_speedups.py``:
  +3% ``unrolled``, +6% ``loop`` at 8 clients). XLA's fusion never duplicates
  a division, and dividing by a runtime 1.0 is exact, forward and backward. CPU only: GPU fusion counts a
  division as cheap, so there it would be a wasted op.
  """
  if jax.default_backend() != "cpu":
    return x
  s = jax.lax.stop_gradient(x.reshape(-1)[0])
  return x / jnp.where(jnp.isfinite(s), 1.0 + 0.0 * s, 1.0).astype(x.dtype)


def _bn(train: bool, name: str | None = None):
  # PyTorch's BatchNorm2d defaults: running-average momentum 0.1, eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class Stem(nn.Module):
  """Unit 1: 3x3 conv, BN, ReLU (CIFAR form: stride 1, no max-pool)."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init)(x)
    return nn.relu(_bn(train)(x))


class BasicBlock(nn.Module):
  """Units 2..9: two 3x3 convs with a residual connection (1x1 conv when shapes change)."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), padding=1,
                use_bias=False, kernel_init=_conv_init)(x)
    y = nn.relu(_bn(train)(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init)(y)
    y = _bn(train)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False,
                  kernel_init=_conv_init, name="shortcut_conv")(x)
      x = _bn(train, name="shortcut_bn")(x)
    return nn.relu(x + y)


class Head(nn.Module):
  """Global average pool + linear; ``conv=True`` puts 3x3 conv-BN-ReLU first.

  Used as the exit head of a client part and (``conv=False``) as the final
  classifier of the server part.
  """
  num_classes: int
  conv: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.conv:
      x = nn.Conv(x.shape[-1], (3, 3), padding=1, use_bias=False, kernel_init=_conv_init)(x)
      x = nn.relu(_bn(train)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class SplitResNet18:
  """The partitioned network: which unit is what, and how to run a span of units."""
  num_classes: int
  width: float = 1.0
  exit_head: str = "linear"  # linear | conv

  @property
  def num_units(self) -> int:
    return NUM_UNITS

  def channels(self, k: int) -> int:
    """Output channels of unit k."""
    stage = 0 if k == 1 else (k - 2) // 2
    return max(1, int(round(64 * 2 ** stage * self.width)))

  def unit(self, k: int) -> nn.Module:
    if not 1 <= k <= NUM_UNITS:
      raise ValueError(f"unit {k} out of range 1..{NUM_UNITS}")
    if k == 1:
      return Stem(self.channels(1))
    first_of_stage = k in (4, 6, 8)
    return BasicBlock(self.channels(k), strides=2 if first_of_stage else 1)

  def head(self, name: str) -> nn.Module:
    if name == EXIT_HEAD:
      return Head(self.num_classes, conv=self.exit_head == "conv")
    if name == CLASSIFIER:
      return Head(self.num_classes)
    raise ValueError(f"unknown head {name!r}")

  def unit_output_shape(self, k: int, image_shape: tuple) -> tuple:
    """(H, W, C) after unit k for an (H, W, 3) image."""
    h, w = image_shape[:2]
    downs = sum(1 for j in (4, 6, 8) if j <= k)
    for _ in range(downs):
      h, w = math.ceil(h / 2), math.ceil(w / 2)
    return (h, w, self.channels(k))

  def input_shape(self, k: int, image_shape: tuple) -> tuple:
    return tuple(image_shape) if k == 1 else self.unit_output_shape(k - 1, image_shape)

  # -- initialisation -------------------------------------------------------
  def init_unit(self, key, k: int, image_shape: tuple) -> tuple[Params, Params]:
    x = jnp.zeros((1,) + self.input_shape(k, image_shape), jnp.float32)
    v = self.unit(k).init(key, x, train=False)
    return v["params"], v.get("batch_stats", {})

  def init_head(self, key, name: str, in_shape: tuple) -> tuple[Params, Params]:
    v = self.head(name).init(key, jnp.zeros((1,) + tuple(in_shape), jnp.float32), train=False)
    return v["params"], v.get("batch_stats", {})

  def init_exit_head(self, key, cut: int, image_shape: tuple) -> tuple[Params, Params]:
    """The exit head after unit ``cut``; its init depends on (key, cut) only."""
    return self.init_head(jax.random.fold_in(key, 100 + cut), EXIT_HEAD,
                          self.unit_output_shape(cut, image_shape))

  def init_span(self, key, first: int, last: int, head: str | None,
                image_shape: tuple) -> tuple[Params, Params]:
    """Variables of units first..last (+ a head). Unit k's init depends only on
    (key, k), so every model that holds unit k starts from the same weights; the
    exit head's depends on (key, cut)."""
    _check_span(first, last)
    params, stats = {}, {}
    for k in range(first, last + 1):
      p, s = self.init_unit(jax.random.fold_in(key, k), k, image_shape)
      params[unit_name(k)] = p
      if s:
        stats[unit_name(k)] = s
    if head is not None:
      if head == EXIT_HEAD:
        p, s = self.init_exit_head(key, last, image_shape)
      else:
        p, s = self.init_head(jax.random.fold_in(key, 0), head,
                              self.unit_output_shape(last, image_shape))
      params[head] = p
      if s:
        stats[head] = s
    return params, stats

  # -- forward ---------------------------------------------------------------
  def apply_span(self, params: Params, stats: Params, x, first: int, last: int,
                 head: str | None, train: bool):
    """Run units first..last (then ``head`` if given).

    Returns ``(features, logits_or_None, new_batch_stats)``; with
    ``train=False`` the batch statistics come back unchanged.
    """
    _check_span(first, last)
    new_stats = dict(stats)
    for k in range(first, last + 1):
      x, new_stats[unit_name(k)] = self._apply(self.unit(k), params, stats, unit_name(k), x, train)
      x = materialize(x)
    logits = None
    if head is not None:
      logits, s = self._apply(self.head(head), params, stats, head, x, train)
      if s is not None:
        new_stats[head] = s
      else:
        new_stats.pop(head, None)
    return x, logits, new_stats

  @staticmethod
  def _apply(module, params, stats, name, x, train):
    variables = {"params": params[name]}
    if name in stats:
      variables["batch_stats"] = stats[name]
    if train and name in stats:
      y, updated = module.apply(variables, x, train=True, mutable=["batch_stats"])
      return y, updated["batch_stats"]
    return module.apply(variables, x, train=train), stats.get(name)


def _check_span(first: int, last: int):
  if not (1 <= first <= last <= NUM_UNITS):
    raise ValueError(
        f"cut layers must increase within 1..{NUM_UNITS}: cannot take units {first}..{last}")


def client_span(cut: int) -> tuple[int, int, str]:
  """(first, last, head) of the client part for cut layer ``cut``."""
  return 1, cut, EXIT_HEAD


def server_span(cut: int) -> tuple[int, int, str]:
  """(first, last, head) of the server part for cut layer ``cut``."""
  return cut + 1, NUM_UNITS, CLASSIFIER


def full_span() -> tuple[int, int, str]:
  """The uncut network: units 1..9 and the final classifier."""
  return 1, NUM_UNITS, CLASSIFIER
