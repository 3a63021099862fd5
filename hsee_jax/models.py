"""Split networks: a network as an ordered list of units that a cut layer splits.

:class:`SplitNetwork` is what the cut machinery needs from a network: its
number of units, each unit and head as a Flax module, the cuts it allows,
and (derived from those, shapes by ``jax.eval_shape``) initialising and
applying a span of units with an optional head. A cut ``l`` gives a *client
part* (units 1..l) that ends in an *exit head*, and a *server part* (units
l+1..L) that ends in the final classifier. Shipped networks, chosen by name
(``Config.model``, :func:`network`): ``resnet18`` (the paper's, CIFAR form),
``vgg16_bn`` and ``mobilenet_v2``.

Parameters and batch statistics live in flat dicts keyed by ``unit_<k>``,
``exit_head`` and ``classifier``, so unit k is the same subtree in every
client and server model that holds it; that is what cross-layer aggregation
matches on. All functions are pure: variables in, outputs and new batch
statistics out, PRNG keys passed explicitly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from hsee_jax import precision as precision_lib

Params = dict[str, Any]

EXIT_HEAD = "exit_head"
CLASSIFIER = "classifier"

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def unit_name(k: int) -> str:
  return f"unit_{k}"


def exit_head_at(cut: int) -> str:
  """The subtree name of an exit head a client trains at ``cut`` below its own
  (a variant's ``exits``); its own cut's head is ``EXIT_HEAD``."""
  return f"{EXIT_HEAD}_at_{cut}"


def is_exit_head(name: str) -> bool:
  """Is ``name`` an exit head (``EXIT_HEAD`` or an :func:`exit_head_at`)?"""
  return name == EXIT_HEAD or name.startswith(EXIT_HEAD + "_at_")


def unit_index(name: str) -> int | None:
  """k of ``unit_<k>``; None for a head."""
  return int(name[5:]) if name.startswith("unit_") else None


def materialize(x):
  """``x``, computed once: XLA:CPU may not fuse it into, and recompute it in, each consumer.

  XLA:CPU's fusion copies cheap elementwise producers into every consumer. A
  unit's output ends a batch-norm / ReLU / residual chain that reaches back
  through every earlier unit, and the backward pass transposes it for the
  kernel-gradient convolution: that transpose fusion recomputed the chain of
  units 1..k (measured by ``experiments/profile_step.py`` and
  ``ab_cpu_speedups.py``; docs/performance.md). XLA's fusion never duplicates
  a division, and dividing by a runtime 1.0 is exact, forward and backward.
  CPU only: GPU fusion counts a division as cheap, so there it would be a
  wasted op.
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
class SplitNetwork:
  """A network cut into units 1..``num_units``; subclasses give the units.

  Fields: ``num_classes``, ``width`` (channel multiplier), ``exit_head_kind``
  (``linear``: pool + dense; ``conv``: a 3x3 conv-BN-ReLU first) and
  ``precision`` (``float32`` or ``bfloat16``: the compute dtype of every unit
  and head, :mod:`hsee_jax.precision`; parameters stay float32). A subclass
  is a frozen dataclass that sets ``name`` and ``num_units`` and defines
  :meth:`unit`; it may override :meth:`allowed_cuts` and :meth:`head`.
  Everything else (shapes, initialisation, spans, the split forward pass) is
  built here from those, so the strategies, the cost table, evaluation and
  checkpoints need nothing network-specific.
  """
  name: ClassVar[str]
  num_units: ClassVar[int]
  num_classes: int
  width: float = 1.0
  exit_head_kind: str = "linear"  # linear | conv
  precision: str = "float32"  # float32 | bfloat16 (precision.resolve)

  def unit(self, k: int) -> nn.Module:
    """The Flax module of unit ``k`` (1-based); called as ``module(x, train=...)``."""
    raise NotImplementedError

  @classmethod
  def allowed_cuts(cls) -> tuple[int, ...]:
    """The cut layers a client may use (the server keeps at least one unit)."""
    return tuple(range(1, cls.num_units))

  @classmethod
  def check_cut(cls, cut) -> None:
    """Raise ValueError (one line, naming the network) unless ``cut`` is allowed."""
    allowed = cls.allowed_cuts()
    if not isinstance(cut, int) or isinstance(cut, bool) or cut not in allowed:
      span = (f"{allowed[0]}..{allowed[-1]}" if allowed == tuple(range(allowed[0], allowed[-1] + 1))
              else ", ".join(map(str, allowed)))
      raise ValueError(f"cut layer {cut!r} out of range for {cls.name} ({cls.num_units} units): "
                       f"a cut is one of {span}")

  def head(self, name: str) -> nn.Module:
    """The exit head (``EXIT_HEAD``) or the final classifier (``CLASSIFIER``)."""
    if name == EXIT_HEAD:
      return Head(self.num_classes, conv=self.exit_head_kind == "conv")
    if name == CLASSIFIER:
      return Head(self.num_classes)
    raise ValueError(f"unknown head {name!r}")

  # -- spans and names ------------------------------------------------------
  def client_span(self, cut: int) -> tuple[int, int, str]:
    """(first, last, head) of the client part for cut layer ``cut``."""
    return 1, cut, EXIT_HEAD

  def server_span(self, cut: int) -> tuple[int, int, str]:
    """(first, last, head) of the server part for cut layer ``cut``."""
    return cut + 1, self.num_units, CLASSIFIER

  def full_span(self) -> tuple[int, int, str]:
    """The uncut network: every unit and the final classifier."""
    return 1, self.num_units, CLASSIFIER

  @staticmethod
  def span_names(first: int, last: int, head: str | None) -> list[str]:
    """The subtree names of a span: ``unit_<k>`` for k in first..last, then the head."""
    return [unit_name(k) for k in range(first, last + 1)] + ([head] if head else [])

  def client_names(self, cut: int) -> list[str]:
    """The subtree names of the client part at ``cut`` (its units, then the exit head)."""
    return self.span_names(*self.client_span(cut))

  def server_names(self, cut: int) -> list[str]:
    """The subtree names of the server part after ``cut`` (its units, then the classifier)."""
    return self.span_names(*self.server_span(cut))

  # -- shapes ----------------------------------------------------------------
  def unit_output_shape(self, k: int, image_shape: tuple) -> tuple:
    """(H, W, C) after unit k for an (H, W, 3) image (by ``jax.eval_shape``)."""
    return _output_shapes(self, tuple(image_shape))[k - 1]

  def input_shape(self, k: int, image_shape: tuple) -> tuple:
    """(H, W, C) that unit k takes: the image for k = 1, else unit k-1's output."""
    return tuple(image_shape) if k == 1 else self.unit_output_shape(k - 1, image_shape)

  # -- initialisation -------------------------------------------------------
  def init_unit(self, key, k: int, image_shape: tuple) -> tuple[Params, Params]:
    """(params, batch_stats) of unit k alone, initialised from ``key``."""
    x = jnp.zeros((1,) + self.input_shape(k, image_shape), jnp.float32)
    v = self.unit(k).init(key, x, train=False)
    return v["params"], v.get("batch_stats", {})

  def init_head(self, key, name: str, in_shape: tuple) -> tuple[Params, Params]:
    """(params, batch_stats) of head ``name`` for (H, W, C) inputs ``in_shape``."""
    v = self.head(name).init(key, jnp.zeros((1,) + tuple(in_shape), jnp.float32), train=False)
    return v["params"], v.get("batch_stats", {})

  def init_exit_head(self, key, cut: int, image_shape: tuple) -> tuple[Params, Params]:
    """The exit head after unit ``cut``; its init depends on (key, cut) only."""
    return self.init_head(jax.random.fold_in(key, 100 + cut), EXIT_HEAD,
                          self.unit_output_shape(cut, image_shape))

  def init_span(self, key, first: int, last: int, head: str | None,
                image_shape: tuple) -> tuple[Params, Params]:
    """(params, batch_stats) of units first..last (+ a head). Unit k's init
    depends only on (key, k), so every model that holds unit k starts from the
    same weights; the exit head's depends on (key, cut)."""
    self._check_span(first, last)
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
    self._check_span(first, last)
    new_stats = dict(stats)
    for k in range(first, last + 1):
      x, new_stats[unit_name(k)] = self._apply(self.unit(k), params, stats, unit_name(k), x, train)
      x = materialize(x)
    logits = None
    if head is not None:
      logits, s = self._apply(self.head(head), params, stats, head, x, train)
      logits = logits.astype(jnp.float32)  # losses and entropies in float32 (a no-op in float32)
      if s is not None:
        new_stats[head] = s
      else:
        new_stats.pop(head, None)
    return x, logits, new_stats

  def split_forward(self, clients, server, x, cuts, train: bool, server_grad_to_client=False,
                    link=None):
    """The forward pass of client parts, then a server part: training and evaluation's one.

    ``clients[i]`` = (params, batch_stats) of the client part at ``cuts[i]``
    (increasing), ``server`` = (params, batch_stats) of the server part after
    the last cut. With one cut this is a client's path; with several, the
    parts must be one whole network split at those cuts (the units between two
    cuts come from the later client part). Without ``server_grad_to_client``
    no gradient flows from the server part into the client parts. ``link``:
    what the server part receives of the activations (:class:`hsee_jax.link.Link`;
    None: the activations themselves).
    Returns ``(exit logits per cut, final logits, client stats per cut, server stats)``.
    """
    first, exits, client_stats = 1, [], []
    for cut, (params, stats) in zip(cuts, clients):
      x, e, s = self.apply_span(params, stats, x, first, cut, EXIT_HEAD, train=train)
      first = cut + 1
      exits.append(e)
      client_stats.append(s)
    h = x if server_grad_to_client else jax.lax.stop_gradient(x)
    if link is not None:
      h = link(h)
    _, logits, server_stats = self.apply_span(server[0], server[1], h,
                                              *self.server_span(cuts[-1]), train=train)
    return exits, logits, client_stats, server_stats

  def _check_span(self, first: int, last: int):
    if not (1 <= first <= last <= self.num_units):
      raise ValueError(f"{self.name}: cut layers must increase within 1..{self.num_units}: "
                       f"cannot take units {first}..{last}")

  def apply_module(self, module, variables: dict, x, **kwargs):
    """``module.apply(variables, x, **kwargs)`` in this network's ``precision``."""
    return precision_lib.apply(module, variables, x, self.precision, **kwargs)

  def _apply(self, module, params, stats, name, x, train):
    variables = {"params": params[name]}
    if name in stats:
      variables["batch_stats"] = stats[name]
    if train and name in stats:
      y, updated = self.apply_module(module, variables, x, train=True, mutable=["batch_stats"])
      return y, updated["batch_stats"]
    return self.apply_module(module, variables, x, train=train), stats.get(name)


@functools.lru_cache(maxsize=None)
def _output_shapes(net: SplitNetwork, image_shape: tuple) -> tuple:
  """(H, W, C) after each unit, traced abstractly (no arrays computed)."""
  shapes, x = [], jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
  for k in range(1, net.num_units + 1):
    module = net.unit(k)
    x = jax.eval_shape(lambda x: module.init_with_output(jax.random.PRNGKey(0), x, train=False)[0], x)
    shapes.append(tuple(x.shape[1:]))
  return tuple(shapes)


# -- ResNet-18 (the paper's network) -------------------------------------------
@dataclasses.dataclass(frozen=True)
class SplitResNet18(SplitNetwork):
  """ResNet-18, CIFAR form (He et al. 2016; 3x3 stem, no max-pool): 9 units.

  Unit 1 is the stem (3x3 conv, BN, ReLU), units 2..9 the eight BasicBlocks
  (four stages of two, 64/128/256/512 channels times ``width``)."""
  name: ClassVar[str] = "resnet18"
  num_units: ClassVar[int] = 9

  def channels(self, k: int) -> int:
    """Output channels of unit k."""
    stage = 0 if k == 1 else (k - 2) // 2
    return max(1, int(round(64 * 2 ** stage * self.width)))

  def unit(self, k: int) -> nn.Module:
    if not 1 <= k <= self.num_units:
      raise ValueError(f"unit {k} out of range 1..{self.num_units}")
    if k == 1:
      return Stem(self.channels(1))
    first_of_stage = k in (4, 6, 8)
    return BasicBlock(self.channels(k), strides=2 if first_of_stage else 1)


# -- VGG-16 with batch norm ----------------------------------------------------
class ConvBN(nn.Module):
  """3x3 conv (with bias, as VGG's), BN, ReLU, then a 2x2 max-pool if ``pool``."""
  features: int
  pool: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding=1, kernel_init=_conv_init)(x)
    x = nn.relu(_bn(train)(x))
    if self.pool:  # "SAME": an odd (or 1-pixel) side rounds up instead of vanishing
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return x


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclasses.dataclass(frozen=True)
class SplitVGG16BN(SplitNetwork):
  """VGG-16 with batch norm (Simonyan & Zisserman 2015; the network of
  Sepehri et al.'s hierarchical training beside ResNet-18), CIFAR form: the
  13 conv layers are units 1..13, each 3x3 conv-BN-ReLU, the five that end a
  stage followed by a 2x2 max-pool; the classifier is global average pooling
  and one linear layer (the ImageNet form's three 4096-wide dense layers are
  for 224x224 inputs)."""
  name: ClassVar[str] = "vgg16_bn"
  num_units: ClassVar[int] = 13

  def unit(self, k: int) -> nn.Module:
    if not 1 <= k <= self.num_units:
      raise ValueError(f"unit {k} out of range 1..{self.num_units}")
    convs = [(c, i + 1 < len(_VGG16) and _VGG16[i + 1] == "M")
             for i, c in enumerate(_VGG16) if c != "M"]
    c, pool = convs[k - 1]
    return ConvBN(max(1, int(round(c * self.width))), pool)


# -- MobileNetV2 ---------------------------------------------------------------
def _divisible(v: float, divisor: int = 8) -> int:
  """MobileNetV2's channel rounding (torchvision's ``_make_divisible``)."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


class ConvBNReLU6(nn.Module):
  features: int
  kernel: int = 3
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.strides, self.strides),
                padding=(self.kernel - 1) // 2, use_bias=False, kernel_init=_conv_init)(x)
    return nn.relu6(_bn(train)(x))


def _windows(xp, strides: int, out_hw: tuple) -> list:
  """The nine 3x3 windows of the padded ``xp``, strided: ``xp[:, s*h + i, s*w + j]``."""
  (ho, wo), s = out_hw, strides
  return [xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
          for i in range(3) for j in range(3)]


def _tap_sum(windows: list, kernel):
  """Sum over the nine taps of window times the kernel's weight at that tap."""
  out = windows[0] * kernel[0, 0, 0]
  for t, k in zip(windows[1:], kernel.reshape(9, -1)[1:]):
    out = out + t * k
  return out


def _pad1(x):
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv3x3(x, kernel, strides: int = 1):
  """3x3 depthwise convolution, padding 1, as nine shifted multiply-adds.

  Equals ``lax.conv_general_dilated`` with ``feature_group_count`` = channels
  (NHWC ``x``, ``kernel`` [3, 3, 1, C]) but runs as elementwise work:
  XLA:CPU's grouped convolutions are many times slower (docs/performance.md,
  Throughput). The gradient is written out (input: the output gradient,
  dilated by the stride, against the flipped kernel; kernel: one reduction
  per tap) rather than derived through the slices, whose derivative pads
  nine full-size tensors.
  """
  out_hw = tuple((n - 1) // strides + 1 for n in x.shape[1:3])
  return _tap_sum(_windows(_pad1(x), strides, out_hw), kernel)


def _depthwise_fwd(x, kernel, strides):
  return depthwise_conv3x3(x, kernel, strides), (x, kernel)


def _depthwise_bwd(strides, res, g):
  x, kernel = res
  (h, w), (ho, wo) = x.shape[1:3], g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  gq = jax.lax.pad(g, zero, [(0, 0, 0), (1, h - strides * (ho - 1), strides - 1),
                             (1, w - strides * (wo - 1), strides - 1), (0, 0, 0)])
  dx = _tap_sum(_windows(gq, 1, (h, w)), kernel[::-1, ::-1])
  # one reduction per tap, in a scan: XLA:CPU runs nine sibling reductions
  # over strided windows several times slower than one after another
  xp, span = _pad1(x), (strides * (ho - 1) + 1, strides * (wo - 1) + 1)

  def tap(_, k):
    t = jax.lax.dynamic_slice(xp, (0, k // 3, k % 3, 0), (x.shape[0],) + span + (x.shape[3],))
    return None, jnp.sum(t[:, ::strides, ::strides, :] * g, axis=(0, 1, 2))

  dk = jax.lax.scan(tap, None, jnp.arange(9))[1]
  return dx, dk.reshape(kernel.shape)


depthwise_conv3x3.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """3x3 depthwise convolution, padding 1, no bias: the parameters of
  ``nn.Conv(C, (3, 3), feature_group_count=C)`` (``kernel`` [3, 3, 1, C]),
  computed by :func:`depthwise_conv3x3` on CPU and by XLA's grouped
  convolution elsewhere."""
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", _conv_init, (3, 3, 1, c), jnp.float32)
    if jax.default_backend() == "cpu":
      return depthwise_conv3x3(x, kernel, self.strides)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.strides,) * 2, ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


class InvertedResidual(nn.Module):
  """1x1 expansion (if ``expand`` > 1), 3x3 depthwise, 1x1 linear projection;
  a residual connection when the shape is kept."""
  features: int
  strides: int
  expand: int

  @nn.compact
  def __call__(self, x, train: bool):
    cin = x.shape[-1]
    hidden = int(round(cin * self.expand))
    y = x
    if self.expand != 1:
      y = ConvBNReLU6(hidden, kernel=1)(y, train)
    y = DepthwiseConv(self.strides, name="Conv_0")(y)  # the names nn.Conv would get
    y = nn.relu6(_bn(train)(y))
    y = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=_conv_init, name="Conv_1")(y)
    y = _bn(train)(y)
    return x + y if self.strides == 1 and cin == self.features else y


# (expansion t, channels c, blocks n, stride s) per stage, Sandler et al. 2018 Table 2
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))


@dataclasses.dataclass(frozen=True)
class SplitMobileNetV2(SplitNetwork):
  """MobileNetV2 (Sandler et al. 2018), CIFAR form: 19 units.

  Unit 1 is the stem (3x3 conv-BN-ReLU6, 32 channels), units 2..18 the 17
  inverted-residual blocks, unit 19 the 1x1 conv to 1280 channels; then
  global average pooling and the linear classifier (the ImageNet form's
  dropout before it is left out). CIFAR form as is usual for 32x32 inputs:
  the stem and the second stage keep stride 1 (ImageNet: 2), so the network
  downsamples 8x, not 32x; strides do not change the parameter count."""
  name: ClassVar[str] = "mobilenet_v2"
  num_units: ClassVar[int] = 19

  def _blocks(self):
    blocks = []
    for stage, (t, c, n, s) in enumerate(_MOBILENET_V2):
      s = 1 if stage == 1 else s  # CIFAR form
      for i in range(n):
        blocks.append((_divisible(c * self.width), s if i == 0 else 1, t))
    return blocks

  def unit(self, k: int) -> nn.Module:
    if not 1 <= k <= self.num_units:
      raise ValueError(f"unit {k} out of range 1..{self.num_units}")
    if k == 1:
      return ConvBNReLU6(_divisible(32 * self.width))
    if k == self.num_units:
      return ConvBNReLU6(_divisible(1280 * max(1.0, self.width)), kernel=1)
    features, strides, expand = self._blocks()[k - 2]
    return InvertedResidual(features, strides, expand)


NETWORKS: dict[str, type[SplitNetwork]] = {
    n.name: n for n in (SplitResNet18, SplitVGG16BN, SplitMobileNetV2)}


def network(name: str, num_classes: int, width: float = 1.0,
            exit_head_kind: str = "linear", precision: str = "float32") -> SplitNetwork:
  """The shipped network ``name`` (``NETWORKS``) for ``num_classes`` classes;
  ``precision`` as ``Config.precision`` (``auto`` resolved for this backend)."""
  if name not in NETWORKS:
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(NETWORKS)}")
  return NETWORKS[name](num_classes, width, exit_head_kind, precision_lib.resolve(precision))


def for_config(cfg, num_classes: int) -> SplitNetwork:
  """The network a run of ``cfg`` trains (model, width, exit head, precision)."""
  return network(cfg.model, num_classes, cfg.width, cfg.exit_head_kind, cfg.precision)
