"""The split networks: for every cut of every shipped network the client part
then the server part is the whole network; shapes, parameter counts against
the published figures, initialisation, cut validation."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsee_jax import models
from hsee_jax.config import Config, ConfigError

SHAPE = (32, 32, 3)
NETS = {name: models.network(name, num_classes=10, width=0.125) for name in models.NETWORKS}
CASES = [(name, cut) for name, net in NETS.items() for cut in net.allowed_cuts()]


@pytest.fixture(scope="module")
def full_variables():
  return {name: net.init_span(jax.random.PRNGKey(0), *net.full_span(), SHAPE)
          for name, net in NETS.items()}


def _take(tree, names):
  return {n: tree[n] for n in names if n in tree}


@pytest.mark.parametrize("name,cut", CASES)
def test_client_then_server_equals_full_network(full_variables, name, cut, train=True):
  """In training mode: the outputs, and the batch statistics each side
  updates (inference mode: test_split_forward_is_the_client_then_server_path)."""
  net = NETS[name]
  params, stats = full_variables[name]
  x = jax.random.normal(jax.random.PRNGKey(1), (4,) + SHAPE)
  _, full_logits, full_stats = net.apply_span(params, stats, x, *net.full_span(), train=train)
  c_names = [models.unit_name(k) for k in range(1, cut + 1)]
  s_names = net.server_names(cut)
  h, _, c_stats = net.apply_span(_take(params, c_names), _take(stats, c_names), x,
                                 1, cut, None, train=train)
  _, logits, s_stats = net.apply_span(_take(params, s_names), _take(stats, s_names), h,
                                      *net.server_span(cut), train=train)
  np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
  # the batch statistics each side updates are the full network's
  chex.assert_trees_all_close({**c_stats, **s_stats}, full_stats, rtol=1e-5, atol=1e-6)
  if train:  # and they did change
    assert not np.allclose(jax.tree.leaves(full_stats["unit_1"])[0],
                           jax.tree.leaves(stats["unit_1"])[0])


@pytest.mark.parametrize("name,cut", CASES)
def test_split_forward_is_the_client_then_server_path(full_variables, name, cut):
  """The one forward pass training and evaluation use: exit logits of the
  client part's head and the server part's logits."""
  net = NETS[name]
  params, stats = full_variables[name]
  cp, cs = net.init_span(jax.random.PRNGKey(2), *net.client_span(cut), SHAPE)
  sv = (_take(params, net.server_names(cut)), _take(stats, net.server_names(cut)))
  x = jax.random.normal(jax.random.PRNGKey(1), (3,) + SHAPE)
  (e,), logits, _, _ = net.split_forward([(cp, cs)], sv, x, [cut], train=False)
  h, e_ref, _ = net.apply_span(cp, cs, x, *net.client_span(cut), train=False)
  chex.assert_shape(h, (3,) + net.unit_output_shape(cut, SHAPE))
  _, ref, _ = net.apply_span(*sv, h, *net.server_span(cut), train=False)
  np.testing.assert_array_equal(e, e_ref)
  np.testing.assert_array_equal(logits, ref)


@pytest.mark.parametrize("cut", models.SplitResNet18.allowed_cuts())
@pytest.mark.parametrize("exit_head", ["linear", "conv"])
def test_part_output_shapes(cut, exit_head):
  net = models.SplitResNet18(num_classes=7, width=0.125, exit_head_kind=exit_head)
  key = jax.random.PRNGKey(0)
  cp, cs = net.init_span(key, *net.client_span(cut), SHAPE)
  sp, ss = net.init_span(key, *net.server_span(cut), SHAPE)
  x = jnp.zeros((3,) + SHAPE)
  h, exit_logits, _ = net.apply_span(cp, cs, x, *net.client_span(cut), train=False)
  chex.assert_shape(h, (3,) + net.unit_output_shape(cut, SHAPE))
  chex.assert_shape(exit_logits, (3, 7))
  _, logits, _ = net.apply_span(sp, ss, h, *net.server_span(cut), train=False)
  chex.assert_shape(logits, (3, 7))
  chex.assert_type([exit_logits, logits], float)
  assert set(cp) == {models.unit_name(k) for k in range(1, cut + 1)} | {models.EXIT_HEAD}
  assert set(sp) == {models.unit_name(k) for k in range(cut + 1, 10)} | {models.CLASSIFIER}
  assert (models.EXIT_HEAD in cs) == (exit_head == "conv")


def _count(tree, units_only=False):
  return int(sum(np.prod(a.shape) for k, v in tree.items()
                 if not units_only or k.startswith("unit_") for a in jax.tree.leaves(v)))


def _params(net, shape=SHAPE):
  return jax.eval_shape(lambda: net.init_span(jax.random.PRNGKey(0), *net.full_span(), shape))[0]


def test_width_one_parameter_counts_are_the_published_ones():
  # ResNet-18, CIFAR form, 10 classes (kuangliu/pytorch-cifar's count, incl. BN scale/bias)
  net = models.network("resnet18", 10)
  assert _count(_params(net)) == 11_173_962
  assert [net.channels(k) for k in range(1, 10)] == [64, 64, 64, 128, 128, 256, 256, 512, 512]
  # MobileNetV2 at 1000 classes: torchvision's mobilenet_v2, 3,504,872 (strides, which
  # the CIFAR form changes, do not change the count)
  assert _count(_params(models.network("mobilenet_v2", 1000))) == 3_504_872
  # VGG-16-BN: torchvision's vgg16_bn has 138,365,992 parameters, of which its
  # ImageNet classifier (25088x4096, 4096x4096, 4096x1000 dense layers with
  # biases) holds 123,642,856; the 13 conv units are the rest
  imagenet_classifier = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
  vgg = _params(models.network("vgg16_bn", 10))
  assert _count(vgg, units_only=True) == 138_365_992 - imagenet_classifier
  assert _count(vgg) - _count(vgg, units_only=True) == 512 * 10 + 10  # pool + linear


def test_output_shapes_come_from_the_network():
  net = models.network("mobilenet_v2", 10)
  assert net.unit_output_shape(1, SHAPE) == (32, 32, 32)
  assert net.unit_output_shape(19, SHAPE) == (4, 4, 1280)  # CIFAR form: 8x downsampling
  vgg = models.network("vgg16_bn", 10)
  assert [vgg.unit_output_shape(k, SHAPE)[0] for k in (1, 2, 4, 7, 10, 13)] == [32, 16, 8, 4, 2, 1]
  assert vgg.unit_output_shape(13, (96, 96, 3)) == (3, 3, 512)  # STL-10


def test_same_unit_same_init_in_every_model():
  net = NETS["resnet18"]
  key = jax.random.PRNGKey(3)
  a, _ = net.init_span(key, *net.server_span(2), SHAPE)
  b, _ = net.init_span(key, *net.client_span(6), SHAPE)
  chex.assert_trees_all_equal(a["unit_4"], b["unit_4"])


def test_spans_must_increase():
  net = NETS["resnet18"]
  with pytest.raises(ValueError, match="resnet18: cut layers must increase"):
    net.apply_span({}, {}, jnp.zeros((1,) + SHAPE), 5, 3, None, train=False)
  with pytest.raises(ValueError, match="cut layers must increase"):
    net.init_span(jax.random.PRNGKey(0), 1, 10, None, SHAPE)


@pytest.mark.parametrize("name,bad,allowed", [("resnet18", 9, "1..8"), ("vgg16_bn", 13, "1..12"),
                                              ("mobilenet_v2", 0, "1..18")])
def test_cut_out_of_range_names_the_network(name, bad, allowed):
  with pytest.raises(ConfigError) as e:
    Config(model=name, cuts=(1, bad))
  msg = str(e.value)
  assert "\n" not in msg and name in msg and allowed in msg and f"cut layer {bad}" in msg, msg
  Config(model=name, cuts=(1, int(allowed.split("..")[1])))  # the last allowed one is fine
  with pytest.raises(ConfigError, match="model: unknown value 'resnet50'; expected one of "
                     "resnet18, vgg16_bn, mobilenet_v2"):
    Config(model="resnet50")


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (2, 7, 9, 3), (1, 1, 1, 4)])
@pytest.mark.parametrize("strides", [1, 2])
def test_depthwise_conv3x3_is_the_grouped_convolution(shape, strides):
  """MobileNetV2's depthwise layers as shifted multiply-adds: the output and
  both gradients of XLA's grouped convolution, odd sizes and stride 2 included."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, shape[-1]))

  def grouped(x, kernel, strides):
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=shape[-1])

  out, ref = models.depthwise_conv3x3(x, kernel, strides), grouped(x, kernel, strides)
  chex.assert_equal_shape([out, ref])
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k, strides)))
  grads = jax.grad(loss(models.depthwise_conv3x3), (0, 1))(x, kernel)
  ref_grads = jax.grad(loss(grouped), (0, 1))(x, kernel)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)


def test_mobilenet_block_is_the_one_built_from_flax_convolutions():
  """An inverted-residual block with ``depthwise_conv3x3`` holds and
  initialises exactly what it would with ``nn.Conv(feature_group_count=C)``
  (same names, same values) and computes the same output."""
  import flax.linen as nn

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      y = models.ConvBNReLU6(48, kernel=1)(x, train)
      y = nn.Conv(48, (3, 3), (2, 2), padding=1, use_bias=False, feature_group_count=48,
                  kernel_init=models._conv_init)(y)
      y = nn.relu6(models._bn(train)(y))
      return models._bn(train)(nn.Conv(16, (1, 1), use_bias=False, kernel_init=models._conv_init)(y))

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 8))
  block = models.InvertedResidual(features=16, strides=2, expand=6)
  ours, ref = (m.init(jax.random.PRNGKey(0), x, train=False) for m in (block, Reference()))
  chex.assert_trees_all_equal(ours, ref)
  np.testing.assert_allclose(block.apply(ours, x, train=False), Reference().apply(ref, x, train=False),
                             rtol=1e-5, atol=1e-5)
