import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax.optim import PartState
from hsee_jax.strategies import cross_layer_average


def _part(params, stats=None):
  arr = lambda t: {n: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for n, d in t.items()}
  params = arr(params)
  return PartState(params=params, batch_stats=arr(stats or {}),
                   opt_state={n: {"m": jnp.full_like(jax.tree.leaves(p)[0], 7.0)}
                              for n, p in params.items()})


def test_cross_layer_average_hand_built():
  # two clients cut after unit 1 (data sizes 1 and 3), one client cut after unit 2 (size 4)
  parts = {
      "client/cut_1": _part({"unit_1": {"w": [[1.0], [3.0]]}, "exit_head": {"w": [[10.0], [20.0]]}},
                            {"unit_1": {"mean": [[0.0], [2.0]]}}),
      "server/cut_1": _part({"unit_2": {"w": [[5.0], [7.0]]}, "classifier": {"w": [[1.0], [2.0]]}}),
      "client/cut_2": _part({"unit_1": {"w": [[9.0]]}, "unit_2": {"w": [[11.0]]},
                             "exit_head": {"w": [[100.0, 200.0]]}},
                            {"unit_1": {"mean": [[4.0]]}}),
      "server/cut_2": _part({"classifier": {"w": [[4.0]]}}),
  }
  w = {"client/cut_1": jnp.array([1.0, 3.0]), "server/cut_1": jnp.array([1.0, 3.0]),
       "client/cut_2": jnp.array([4.0]), "server/cut_2": jnp.array([4.0])}
  out = jax.jit(cross_layer_average)(parts, w)
  get = lambda k, n, leaf="w", stats=False: np.asarray(
      (out[k].batch_stats if stats else out[k].params)[n][leaf])
  # unit 1: client parts of all three clients: (1*1 + 3*3 + 4*9) / 8
  np.testing.assert_allclose(get("client/cut_1", "unit_1"), [[5.75], [5.75]])
  np.testing.assert_allclose(get("client/cut_2", "unit_1"), [[5.75]])
  # its batch statistics too: (1*0 + 3*2 + 4*4) / 8
  np.testing.assert_allclose(get("client/cut_1", "unit_1", "mean", True), [[2.75], [2.75]])
  np.testing.assert_allclose(get("client/cut_2", "unit_1", "mean", True), [[2.75]])
  # unit 2: server parts of the cut-1 clients and the client part of the cut-2 client
  np.testing.assert_allclose(get("server/cut_1", "unit_2"), [[8.75], [8.75]])
  np.testing.assert_allclose(get("client/cut_2", "unit_2"), [[8.75]])
  # final classifier over all server parts: (1*1 + 3*2 + 4*4) / 8
  np.testing.assert_allclose(get("server/cut_1", "classifier"), [[2.875], [2.875]])
  np.testing.assert_allclose(get("server/cut_2", "classifier"), [[2.875]])
  # exit heads only among clients that share a cut
  np.testing.assert_allclose(get("client/cut_1", "exit_head"), [[17.5], [17.5]])
  np.testing.assert_allclose(get("client/cut_2", "exit_head"), [[100.0, 200.0]])
  # optimiser states stay local
  for k in parts:
    for n in parts[k].opt_state:
      np.testing.assert_array_equal(out[k].opt_state[n]["m"], parts[k].opt_state[n]["m"])


def test_equal_weights_is_plain_mean():
  parts = {"a": _part({"unit_3": {"w": [[2.0, 4.0], [6.0, 8.0], [1.0, 0.0]]}})}
  out = cross_layer_average(parts, {"a": jnp.ones(3)})
  np.testing.assert_allclose(out["a"].params["unit_3"]["w"], [[3.0, 4.0]] * 3)
