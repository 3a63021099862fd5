import dataclasses

import chex
import jax
import numpy as np

from hsee_jax import models
from hsee_jax import train as train_lib
from hsee_jax.config import Config
from hsee_jax.engine import tree_slice
from hsee_jax.strategies import SHARED_SERVER, group_key

CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 32), width=0.125,
             cuts=(3, 7), batch_size=8, local_steps=2, rounds=2, augment=False)


def test_sequential_server_continues_from_each_clients_cut():
  cfg = dataclasses.replace(CFG, strategy="sequential", cuts=(7, 3))
  _, st = train_lib.build(cfg)
  state = st.init_state(jax.random.PRNGKey(0))
  server = state.servers[SHARED_SERVER]
  # the shared server holds units min(cuts)+1..9 and the classifier
  assert set(server.params) == {models.unit_name(k) for k in range(4, 10)} | {models.CLASSIFIER}
  # client 0 (cut 7) trains first: server units 4..7 must not move, momentum included
  xs, key = st.client_inputs(0, 0, jax.random.PRNGKey(1))
  client = tree_slice(state.clients[group_key(7)], 0)
  sub = server.subset([models.unit_name(k) for k in (8, 9)] + [models.CLASSIFIER])
  (_, sub), _ = st.runners[7].one(st.shared, (client, sub, key), xs)
  after = server.merge(sub)
  for k in (4, 5, 6, 7):
    chex.assert_trees_all_equal(after.params[models.unit_name(k)], server.params[models.unit_name(k)])
    chex.assert_trees_all_equal(after.opt_state[models.unit_name(k)], server.opt_state[models.unit_name(k)])
  for k in (8, 9):
    assert not np.allclose(after.params[models.unit_name(k)]["Conv_0"]["kernel"],
                           server.params[models.unit_name(k)]["Conv_0"]["kernel"])
  # a whole round: then client 1 (cut 3) has also trained units 4..7 on the server
  new, metrics = st.run_round(state, 0, jax.random.PRNGKey(1))
  assert metrics.shape == (2, 4) and np.isfinite(metrics).all()
  assert not np.allclose(new.servers[SHARED_SERVER].params["unit_4"]["Conv_0"]["kernel"],
                         server.params["unit_4"]["Conv_0"]["kernel"])


def test_averaging_makes_every_copy_of_a_unit_equal():
  cfg = dataclasses.replace(CFG, cuts=(3, 7, 3), partition="dirichlet", dirichlet_alpha=0.5)
  _, st = train_lib.build(cfg)
  state, _ = st.run_round(st.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  copies = {}
  for part in list(state.clients.values()) + list(state.servers.values()):
    for name in part.params:
      if name != models.EXIT_HEAD:
        for j in range(jax.tree.leaves(part.params[name])[0].shape[0]):
          copies.setdefault(name, []).append(tree_slice(part.params[name], j))
  assert len(copies["unit_1"]) == 3 and len(copies["unit_5"]) == 3 and len(copies["classifier"]) == 3
  for name, trees in copies.items():
    for t in trees[1:]:
      chex.assert_trees_all_close(t, trees[0], rtol=1e-6, atol=1e-7)


def test_aggregate_every_skips_rounds():
  cfg = dataclasses.replace(CFG, aggregate_every=2)
  _, st = train_lib.build(cfg)
  state, _ = st.run_round(st.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  # after round 1 of 2: no aggregation yet, so unit 5 of client 0's server part differs
  # from unit 5 of client 1's client part
  a = state.servers[group_key(3)].params["unit_5"]["Conv_0"]["kernel"][0]
  b = state.clients[group_key(7)].params["unit_5"]["Conv_0"]["kernel"][0]
  assert not np.allclose(a, b)
  state, _ = st.run_round(state, 1, jax.random.PRNGKey(1))
  a = state.servers[group_key(3)].params["unit_5"]["Conv_0"]["kernel"][0]
  b = state.clients[group_key(7)].params["unit_5"]["Conv_0"]["kernel"][0]
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_server_gradient_reaches_client_only_when_asked():
  outs = {}
  for flag in (False, True):
    cfg = dataclasses.replace(CFG, cuts=(3,), server_grad_to_client=flag, local_steps=1)
    _, st = train_lib.build(cfg)
    state, _ = st.run_round(st.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
    outs[flag] = state
  # after one step the server update is the same either way (same input h); the client differs
  chex.assert_trees_all_close(outs[False].servers["cut_3"].params["classifier"],
                              outs[True].servers["cut_3"].params["classifier"], rtol=1e-5)
  assert not np.allclose(outs[False].clients["cut_3"].params["unit_1"]["Conv_0"]["kernel"],
                         outs[True].clients["cut_3"].params["unit_1"]["Conv_0"]["kernel"])


def test_sequential_cross_layer_option_averages_client_parts_only():
  cfg = dataclasses.replace(CFG, strategy="sequential", cuts=(3, 7, 3),
                            client_aggregation="cross_layer")
  _, st = train_lib.build(cfg)
  state, _ = st.run_round(st.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  u3 = state.clients[group_key(3)].params["unit_2"]["Conv_0"]["kernel"]
  u7 = state.clients[group_key(7)].params["unit_2"]["Conv_0"]["kernel"]
  np.testing.assert_allclose(u3[0], u3[1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(u3[0], u7[0], rtol=1e-6, atol=1e-7)
  # client 1 (cut 7) is the only client holding units 4..7; the shared server's
  # copy of unit 4 is not pulled into the client average
  assert not np.allclose(state.clients[group_key(7)].params["unit_4"]["Conv_0"]["kernel"][0],
                         state.servers[SHARED_SERVER].params["unit_4"]["Conv_0"]["kernel"])


def test_sequential_refuses_stacked_modes():
  import pytest
  from hsee_jax.config import ConfigError
  with pytest.raises(ConfigError, match="sequential trains them one at a time"):
    dataclasses.replace(CFG, strategy="sequential", mode="vmap")


def test_nonfinite_parts_names_the_client_and_part():
  cfg = dataclasses.replace(CFG, cuts=(3, 7, 3))
  _, st = train_lib.build(cfg)
  state = st.init_state(jax.random.PRNGKey(0))
  assert st.nonfinite_parts(state) == []
  g = group_key(3)
  k = state.servers[g].params["unit_9"]["Conv_0"]["kernel"]
  servers = dict(state.servers)
  servers[g] = servers[g].replace(params={**servers[g].params,
                                          "unit_9": {**servers[g].params["unit_9"],
                                                     "Conv_0": {"kernel": k.at[1, 0].set(np.nan)}}})
  bad = st.nonfinite_parts(state.replace(servers=servers))
  assert bad == ["client 2 (cut 3) server part"]
