import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsee_jax import models
from hsee_jax.config import NUM_UNITS

NET = models.SplitResNet18(num_classes=10, width=0.125)
SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def full_variables():
  return NET.init_span(jax.random.PRNGKey(0), *models.full_span(), SHAPE)


def _take(tree, names):
  return {n: tree[n] for n in names if n in tree}


@pytest.mark.parametrize("cut", range(1, NUM_UNITS))
@pytest.mark.parametrize("train", [False, True])
def test_client_then_server_equals_full_network(full_variables, cut, train):
  params, stats = full_variables
  x = jax.random.normal(jax.random.PRNGKey(1), (4,) + SHAPE)
  _, full_logits, full_stats = NET.apply_span(params, stats, x, *models.full_span(), train=train)
  c_names = [models.unit_name(k) for k in range(1, cut + 1)]
  s_names = [models.unit_name(k) for k in range(cut + 1, NUM_UNITS + 1)] + [models.CLASSIFIER]
  h, _, c_stats = NET.apply_span(_take(params, c_names), _take(stats, c_names), x,
                                 1, cut, None, train=train)
  _, logits, s_stats = NET.apply_span(_take(params, s_names), _take(stats, s_names), h,
                                      *models.server_span(cut), train=train)
  np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-5)
  # the batch statistics each side updates are the full network's
  chex.assert_trees_all_close({**c_stats, **s_stats}, full_stats, rtol=1e-5, atol=1e-6)
  if train:  # and they did change
    assert not np.allclose(full_stats["unit_1"]["BatchNorm_0"]["mean"],
                           stats["unit_1"]["BatchNorm_0"]["mean"])


@pytest.mark.parametrize("cut", range(1, NUM_UNITS))
@pytest.mark.parametrize("exit_head", ["linear", "conv"])
def test_part_output_shapes(cut, exit_head):
  net = models.SplitResNet18(num_classes=7, width=0.125, exit_head=exit_head)
  key = jax.random.PRNGKey(0)
  cp, cs = net.init_span(key, *models.client_span(cut), SHAPE)
  sp, ss = net.init_span(key, *models.server_span(cut), SHAPE)
  x = jnp.zeros((3,) + SHAPE)
  h, exit_logits, _ = net.apply_span(cp, cs, x, *models.client_span(cut), train=False)
  chex.assert_shape(h, (3,) + net.unit_output_shape(cut, SHAPE))
  chex.assert_shape(exit_logits, (3, 7))
  _, logits, _ = net.apply_span(sp, ss, h, *models.server_span(cut), train=False)
  chex.assert_shape(logits, (3, 7))
  chex.assert_type([exit_logits, logits], float)
  assert set(cp) == {models.unit_name(k) for k in range(1, cut + 1)} | {models.EXIT_HEAD}
  assert set(sp) == {models.unit_name(k) for k in range(cut + 1, NUM_UNITS + 1)} | {models.CLASSIFIER}
  assert (models.EXIT_HEAD in cs) == (exit_head == "conv")


def test_width_one_is_resnet18():
  net = models.SplitResNet18(num_classes=10, width=1.0)
  params = jax.eval_shape(lambda: net.init_span(jax.random.PRNGKey(0), *models.full_span(), SHAPE))[0]
  n = sum(np.prod(a.shape) for a in jax.tree.leaves(params))
  assert n == 11_173_962  # the CIFAR ResNet-18 parameter count (incl. BN scale/bias)
  assert [net.channels(k) for k in range(1, 10)] == [64, 64, 64, 128, 128, 256, 256, 512, 512]


def test_same_unit_same_init_in_every_model():
  key = jax.random.PRNGKey(3)
  a, _ = NET.init_span(key, *models.server_span(2), SHAPE)
  b, _ = NET.init_span(key, *models.client_span(6), SHAPE)
  chex.assert_trees_all_equal(a["unit_4"], b["unit_4"])


def test_spans_must_increase():
  with pytest.raises(ValueError, match="cut layers must increase"):
    NET.apply_span({}, {}, jnp.zeros((1,) + SHAPE), 5, 3, None, train=False)
  with pytest.raises(ValueError, match="cut layers must increase"):
    NET.init_span(jax.random.PRNGKey(0), 1, 10, None, SHAPE)
