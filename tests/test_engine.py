import dataclasses

import chex
import jax
import numpy as np
import pytest

from hsee_jax import train as train_lib
from hsee_jax.config import Config
from hsee_jax.engine import ClientRunner, tree_slice
from hsee_jax.strategies import group_key, split_update

CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 32), width=0.125,
             cuts=(4, 4), batch_size=8, local_steps=3, rounds=2, augment=True)


def _run(mode, scan_steps):
  _, st = train_lib.build(dataclasses.replace(CFG, mode=mode))
  state = st.init_state(jax.random.PRNGKey(0))
  runner = ClientRunner(split_update(st.net, st.tx, CFG, 4), mode, scan_steps=scan_steps)
  inputs = [st.client_inputs(0, i, jax.random.PRNGKey(1)) for i in range(2)]
  xs = jax.tree.map(lambda *a: np.stack(a), *[x for x, _ in inputs])
  keys = jax.numpy.stack([k for _, k in inputs])
  g = group_key(4)
  (client, server), metrics = runner(st.shared, (state.clients[g], state.servers[g], keys), xs)
  return client, server, metrics, state


@pytest.fixture(scope="module")
def reference():
  return _run("debug", False)


@pytest.mark.parametrize("mode,scan_steps", [("loop", False), ("loop", True), ("vmap", False),
                                             ("vmap", True), ("unrolled", False)])
def test_backends_agree_with_debug(reference, mode, scan_steps):
  client, server, metrics, start = _run(mode, scan_steps)
  r_client, r_server, r_metrics, _ = reference
  # vmap turns per-client convolutions into grouped ones: float32 rounding differs slightly
  chex.assert_trees_all_close(client.params, r_client.params, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(server.params, r_server.params, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(client.batch_stats, r_client.batch_stats, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(metrics, r_metrics, rtol=1e-4, atol=1e-5)
  # and training moved the parameters (the comparison is not vacuous)
  assert not np.allclose(client.params["unit_1"]["Conv_0"]["kernel"],
                         start.clients["cut_4"].params["unit_1"]["Conv_0"]["kernel"])
  # the two clients saw different data, so they differ
  assert not np.allclose(client.params["exit_head"]["Dense_0"]["kernel"][0],
                         client.params["exit_head"]["Dense_0"]["kernel"][1])


@pytest.mark.parametrize("strategy,mode", [("averaging", "loop"), ("averaging", "vmap"),
                                           ("sequential", "loop")])
def test_one_compilation_per_cut_and_none_after_first_round(strategy, mode):
  cfg = dataclasses.replace(CFG, cuts=(2, 5, 5, 7, 2), strategy=strategy, mode=mode, rounds=3)
  _, st = train_lib.build(cfg)
  state = st.init_state(jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(1)
  state, _ = st.run_round(state, 0, key)
  after_first = {c: r.num_traces for c, r in st.runners.items()}
  assert sorted(st.runners) == [2, 5, 7]          # one runner per distinct cut, not per client
  assert all(n == 1 for n in after_first.values()), after_first
  for rnd in (1, 2):
    state, _ = st.run_round(state, rnd, key)
  assert {c: r.num_traces for c, r in st.runners.items()} == after_first
