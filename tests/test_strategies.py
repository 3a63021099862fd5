import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsee_jax import models, optim
from hsee_jax import train as train_lib
from hsee_jax.config import Config, ConfigError
from hsee_jax.optim import PartState
from hsee_jax.strategies import (chunk_sums, combine_sides, combine_sums, cross_layer_average,
                                 group_key, step_inputs)

CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 32), width=0.125,
             cuts=(3, 7), batch_size=8, local_steps=2, rounds=2, augment=False)
KERNEL = lambda tree, k: tree[models.unit_name(k)]["Conv_0"]["kernel"]


def test_sequential_server_continues_from_each_clients_cut():
  cfg = dataclasses.replace(CFG, strategy="sequential", cuts=(7, 3))
  _, sim = train_lib.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  server = state.server
  # the shared server holds units min(cuts)+1..9 and the classifier
  assert set(server.params) == {models.unit_name(k) for k in range(4, 10)} | {models.CLASSIFIER}
  # client 0 (cut 7) trains first: server units 4..7 must not move, momentum included
  cohort = sim.cohort(0, jax.random.PRNGKey(1))
  client = jax.tree.map(lambda a: a[0], state.clients[group_key(7)])
  sub = server.subset(sim.net.server_names(7))
  xs = step_inputs(cohort, 0)
  (_, sub), _ = sim.runners[7].one(sim.ctx.train_set, (client, sub, cohort.keys[0]), xs)
  after = server.merge(sub)
  for k in (4, 5, 6, 7):
    chex.assert_trees_all_equal(after.params[models.unit_name(k)], server.params[models.unit_name(k)])
    chex.assert_trees_all_equal(after.opt_state[models.unit_name(k)], server.opt_state[models.unit_name(k)])
  for k in (8, 9):
    assert not np.allclose(KERNEL(after.params, k), KERNEL(server.params, k))
  # a whole round: then client 1 (cut 3) has also trained units 4..7 on the server
  before = np.asarray(KERNEL(server.params, 4))
  new, metrics, _ = sim.run_round(state, 0, jax.random.PRNGKey(1))
  assert metrics.shape == (2, 4) and np.isfinite(metrics).all()
  assert not np.allclose(KERNEL(new.server.params, 4), before)


def _random_part(rng, names, k):
  shape = {n: (k, 3) for n in names}
  return PartState(params={n: {"w": jnp.asarray(rng.normal(size=s), jnp.float32)}
                           for n, s in shape.items()},
                   batch_stats={n: {"m": jnp.asarray(rng.normal(size=s), jnp.float32)}
                                for n, s in shape.items() if n.startswith("unit")},
                   opt_state={})


@pytest.mark.parametrize("chunk", [1, 2, 8, None])
def test_streaming_aggregation_equals_cross_layer_average(chunk):
  """Chunk-by-chunk weighted sums (padding at weight 0) combined per cut give
  the reference ``cross_layer_average``, to float32 rounding (rtol 1e-6): the
  same sums in the same order, but compiled as other programs, where XLA
  fuses (and so rounds) the multiply-adds differently. None: each cut's
  clients as one unpadded chunk."""
  rng = np.random.default_rng(0)
  units = lambda a, b: [models.unit_name(k) for k in range(a, b + 1)]
  groups = {2: 3, 5: 4, 8: 1}  # cut -> clients
  client = {c: _random_part(rng, units(1, c) + [models.EXIT_HEAD], n) for c, n in groups.items()}
  server = {c: _random_part(rng, units(c + 1, 9) + [models.CLASSIFIER], n) for c, n in groups.items()}
  weights = {c: jnp.asarray(rng.integers(1, 50, n), jnp.float32) for c, n in groups.items()}
  ref = jax.jit(cross_layer_average)({**{f"client/{c}": p for c, p in client.items()},
                             **{f"server/{c}": p for c, p in server.items()}},
                            {**{f"client/{c}": w for c, w in weights.items()},
                             **{f"server/{c}": w for c, w in weights.items()}})
  full = {c: client[c].merge(server[c]) for c in groups}
  sums = {}
  for c, n in groups.items():
    size = chunk or n
    for start in range(0, n, size):
      idx = np.arange(start, start + size)
      w = jnp.where(idx < n, weights[c][np.minimum(idx, n - 1)], 0.0)  # padded at weight 0
      part = jax.tree.map(lambda a: a[np.minimum(idx, n - 1)], full[c])
      sums[c] = jax.jit(chunk_sums)(part, w, sums.get(c))
  model0 = jax.tree.map(lambda a: a[0], PartState(
      params={n: full[2].params[n] for n in units(1, 9) + [models.CLASSIFIER]},
      batch_stats={n: full[2].batch_stats[n] for n in units(1, 9)}, opt_state={}))
  heads0 = {group_key(c): jax.tree.map(lambda a: a[0], PartState(
      params=client[c].params[models.EXIT_HEAD], batch_stats={}, opt_state={}))
      for c in groups}
  model, heads, _ = jax.jit(combine_sums)(model0, heads0, sums)
  check = lambda a, b: chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-6)
  for c in groups:
    got = model
    for side, names in (("client", units(1, c)), ("server", units(c + 1, 9) + [models.CLASSIFIER])):
      want = ref[f"{side}/{c}"]
      for n in names:
        check(got.params[n], jax.tree.map(lambda a: a[0], want.params[n]))
        if n in want.batch_stats:
          check(got.batch_stats[n], jax.tree.map(lambda a: a[0], want.batch_stats[n]))
    check(heads[group_key(c)].params,
          jax.tree.map(lambda a: a[0], ref[f"client/{c}"].params[models.EXIT_HEAD]))


def test_zero_total_keeps_old_values():
  part = PartState(params={"unit_1": {"w": jnp.ones((2, 3))}, models.EXIT_HEAD: {"w": jnp.ones((2, 3))}},
                   batch_stats={}, opt_state={})
  sums = {1: chunk_sums(part, jnp.zeros(2), None)}
  model = PartState(params={"unit_1": {"w": jnp.full(3, 5.0)}}, batch_stats={}, opt_state={})
  heads = {"cut_1": PartState(params={"w": jnp.full(3, 7.0)}, batch_stats={}, opt_state={})}
  model, heads, _ = combine_sums(model, heads, sums)
  np.testing.assert_array_equal(model.params["unit_1"]["w"], 5.0)
  np.testing.assert_array_equal(heads["cut_1"].params["w"], 7.0)


def test_aggregate_every_keeps_client_models_between_aggregations():
  cfg = dataclasses.replace(CFG, cuts=(3, 7, 3), aggregate_every=2)
  _, sim = train_lib.build(cfg)
  state, _, _ = sim.run_round(sim.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  # after round 1 of 2: no aggregation yet; each client holds its own models
  k3, k7 = state.clients[group_key(3)].params, state.clients[group_key(7)].params
  assert not np.allclose(KERNEL(k3, 5)[0], KERNEL(k7, 5)[0])
  assert not np.allclose(KERNEL(k3, 1)[0], KERNEL(k3, 1)[1])
  state, _, _ = sim.run_round(state, 1, jax.random.PRNGKey(1))
  k3, k7 = state.clients[group_key(3)].params, state.clients[group_key(7)].params
  for k in (1, 5, 9):  # client part of one, server part of another: one average
    np.testing.assert_array_equal(KERNEL(k3, k)[0], KERNEL(k7, k)[0])
    np.testing.assert_array_equal(KERNEL(k3, k)[1], KERNEL(state.model.params, k))


def test_server_gradient_reaches_client_only_when_asked():
  outs = {}
  for flag in (False, True):
    cfg = dataclasses.replace(CFG, cuts=(3,), server_grad_to_client=flag, local_steps=1)
    _, sim = train_lib.build(cfg)
    outs[flag], _, _ = sim.run_round(sim.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  # after one step the server update is the same either way (same input h); the client differs
  chex.assert_trees_all_close(outs[False].model.params["classifier"],
                              outs[True].model.params["classifier"], rtol=1e-5)
  assert not np.allclose(KERNEL(outs[False].model.params, 1), KERNEL(outs[True].model.params, 1))


def test_sequential_cross_layer_option_averages_client_parts_only():
  cfg = dataclasses.replace(CFG, strategy="sequential", cuts=(3, 7, 3),
                            client_aggregation="cross_layer")
  _, sim = train_lib.build(cfg)
  state, _, _ = sim.run_round(sim.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  u3 = KERNEL(state.clients[group_key(3)].params, 2)
  u7 = KERNEL(state.clients[group_key(7)].params, 2)
  np.testing.assert_allclose(u3[0], u3[1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(u3[0], u7[0], rtol=1e-6, atol=1e-7)
  # client 1 (cut 7) is the only client holding units 4..7; the shared server's
  # copy of unit 4 is not pulled into the client average
  assert not np.allclose(KERNEL(state.clients[group_key(7)].params, 4)[0],
                         KERNEL(state.server.params, 4))


def test_sequential_refuses_stacked_modes():
  with pytest.raises(ConfigError, match="sequential trains them one at a time"):
    dataclasses.replace(CFG, strategy="sequential", mode="vmap")


def test_nonfinite_parts_names_the_client_and_part():
  cfg = dataclasses.replace(CFG, cuts=(3, 7, 3), strategy="sequential")
  _, sim = train_lib.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  assert sim.algorithm.nonfinite_parts(state) == []
  g = group_key(3)
  k = KERNEL(state.clients[g].params, 2)
  part = state.clients[g]
  bad_part = part.replace(params={**part.params, "unit_2": {**part.params["unit_2"],
                                                            "Conv_0": {"kernel": k.at[1, 0].set(np.nan)}}})
  bad_state = state.replace(clients={**state.clients, g: bad_part})
  assert sim.algorithm.nonfinite_parts(bad_state) == ["client 2 (cut 3) client part"]
  # restricted to the clients that trained this round
  assert sim.algorithm.nonfinite_parts(bad_state, np.array([0, 1])) == []
  assert sim.algorithm.nonfinite_parts(bad_state, np.array([2])) == ["client 2 (cut 3) client part"]
  _, sim = train_lib.build(dataclasses.replace(cfg, strategy="averaging"))
  state = sim.init_state(jax.random.PRNGKey(0))
  model = state.model
  k = KERNEL(model.params, 9)
  model = model.replace(params={**model.params, "unit_9": {**model.params["unit_9"],
                                                           "Conv_0": {"kernel": k.at[0].set(np.inf)}}})
  assert sim.algorithm.nonfinite_parts(state.replace(model=model)) == ["model unit_9"]


def test_tier_local_top_unit_is_averaged_within_its_tier_only():
  """tier_local_top (InclusiveFL): unit 1 of the tier at cut 1 is averaged
  over that tier's clients alone, the shared copy over the other holders
  (here the cut-2 tier's client parts); without it, over both."""
  unit1, unit2 = models.unit_name(1), models.unit_name(2)
  part = lambda v, names, k: PartState(
      params={n: {"w": jnp.full((k, 3), v, jnp.float32)} for n in names}, batch_stats={},
      opt_state={})
  sums = {1: chunk_sums(part(1.0, [unit1, unit2, models.EXIT_HEAD], 2), jnp.ones(2), None),
          2: chunk_sums(part(3.0, [unit1, unit2, models.EXIT_HEAD], 1), jnp.full(1, 2.0), None)}
  model = PartState(params={n: {"w": jnp.zeros(3)} for n in (unit1, unit2)}, batch_stats={},
                    opt_state={})
  heads = {group_key(c): PartState(params={"w": jnp.zeros(3)}, batch_stats={}, opt_state={})
           for c in (1, 2)}
  tiers = {group_key(1): PartState(params={unit1: {"w": jnp.zeros(3)}}, batch_stats={},
                                   opt_state={})}
  shared, _, tiers_out = combine_sums(model, heads, sums, tiers)
  np.testing.assert_allclose(tiers_out[group_key(1)].params[unit1]["w"], 1.0)   # tier 1 alone
  np.testing.assert_allclose(shared.params[unit1]["w"], 3.0)                    # the others
  np.testing.assert_allclose(shared.params[unit2]["w"], (2 * 1.0 + 2 * 3.0) / 4)  # as before
  plain, _, none = combine_sums(model, heads, sums)
  np.testing.assert_allclose(plain.params[unit1]["w"], (2 * 1.0 + 2 * 3.0) / 4)
  assert none == {}


def test_tier_local_top_in_a_run():
  """A run with tier_local_top: each tier holds its own copy of its top
  unit, which its evaluated network uses and which differs from the shared
  copy after training; refused for Sequential in one line."""
  cfg = dataclasses.replace(CFG, cuts=(3, 7, 3, 7), tier_local_top=True)
  _, sim = train_lib.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  assert {g: set(t.params) for g, t in state.tier_units.items()} == {
      group_key(3): {models.unit_name(3)}, group_key(7): {models.unit_name(7)}}
  for rnd in range(2):
    state, metrics = sim.algorithm.apply(state, sim.cohort(rnd, jax.random.PRNGKey(1)))
  assert np.isfinite(np.asarray(metrics)).all() and not sim.algorithm.nonfinite_parts(state)
  for m in sim.algorithm.eval_models(state):
    top = models.unit_name(m.cut)
    own = state.tier_units[group_key(m.cut)].params[top]
    chex.assert_trees_all_equal(m.client.params[top], own)
    assert not np.allclose(KERNEL(m.client.params, m.cut), KERNEL(state.model.params, m.cut))
  with pytest.raises(ConfigError, match=r"^tier_local_top: True has no effect in this config: it needs strategy=averaging"):
    dataclasses.replace(CFG, strategy="sequential", tier_local_top=True)


def test_sides_apart_average_each_unit_over_its_sides_holders_only():
  """aggregate_sides=apart (SplitFed): with cuts 1 and 2, unit 2 is in the
  cut-2 clients' client parts and the cut-1 clients' server parts; its
  client-side copy is averaged over the first, its server-side copy over the
  second; a unit one side holds (unit 1, the classifier) averages as before."""
  names = [models.unit_name(1), models.unit_name(2), models.CLASSIFIER, models.EXIT_HEAD]
  part = lambda v, k: PartState(params={n: {"w": jnp.full((k, 3), v, jnp.float32)} for n in names},
                                batch_stats={}, opt_state={})
  sums = {1: chunk_sums(part(1.0, 2), jnp.ones(2), None),
          2: chunk_sums(part(3.0, 1), jnp.full(1, 2.0), None)}
  model = PartState(params={n: {"w": jnp.zeros(3)} for n in names[:3]}, batch_stats={},
                    opt_state={})
  server = PartState(params={models.unit_name(2): {"w": jnp.zeros(3)}}, batch_stats={}, opt_state={})
  heads = {group_key(c): PartState(params={"w": jnp.zeros(3)}, batch_stats={}, opt_state={})
           for c in (1, 2)}
  shared, heads_out, _, server_out = combine_sides(model, server, heads, sums)
  together, heads_plain, _ = combine_sums(model, heads, sums)
  np.testing.assert_allclose(shared.params[models.unit_name(2)]["w"], 3.0)        # client side
  np.testing.assert_allclose(server_out.params[models.unit_name(2)]["w"], 1.0)    # server side
  np.testing.assert_allclose(together.params[models.unit_name(2)]["w"], 2.0)      # one average
  for n in (models.unit_name(1), models.CLASSIFIER):
    chex.assert_trees_all_equal(shared.params[n], together.params[n])
  chex.assert_trees_all_equal(heads_out, heads_plain)


def test_sides_apart_in_a_run():
  """A run with aggregate_sides=apart: the state holds a server-side copy of
  each unit between the fleet's lowest and highest cut; after training it
  differs from the client-side copy; a tier's evaluated server part takes
  the server side's copies, its client part the client side's; refused for
  Sequential in one line."""
  cfg = dataclasses.replace(CFG, cuts=(3, 7, 3, 7), aggregate_sides="apart")
  _, sim = train_lib.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  assert set(state.server_units.params) == {models.unit_name(k) for k in range(4, 8)}
  for rnd in range(2):
    state, metrics = sim.algorithm.apply(state, sim.cohort(rnd, jax.random.PRNGKey(1)))
  assert np.isfinite(np.asarray(metrics)).all() and not sim.algorithm.nonfinite_parts(state)
  assert not np.allclose(KERNEL(state.server_units.params, 5), KERNEL(state.model.params, 5))
  evaluated = {m.cut: m for m in sim.algorithm.eval_models(state)}
  assert not any(m.one_network for m in evaluated.values())
  chex.assert_trees_all_equal(evaluated[3].server.params[models.unit_name(5)],
                              state.server_units.params[models.unit_name(5)])
  chex.assert_trees_all_equal(evaluated[7].client.params[models.unit_name(5)],
                              state.model.params[models.unit_name(5)])
  with pytest.raises(ConfigError, match=r"^aggregate_sides: 'apart' has no effect in this config: it needs strategy=averaging"):
    dataclasses.replace(CFG, strategy="sequential", aggregate_sides="apart")


def test_every_exit_head_is_averaged_over_every_client_that_trains_one():
  """client_exits=every (DepthFL): the exit head at cut 1 is averaged over the
  clients at cut 1 (their exit_head) and the deeper clients' exit_head_at_1;
  without lower heads in the sums, over cut 1's clients only."""
  unit1, low = models.unit_name(1), models.exit_head_at(1)
  part = lambda v, names, k: PartState(
      params={n: {"w": jnp.full((k, 3), v, jnp.float32)} for n in names}, batch_stats={},
      opt_state={})
  model = PartState(params={unit1: {"w": jnp.zeros(3)}}, batch_stats={}, opt_state={})
  heads = {group_key(c): PartState(params={"w": jnp.zeros(3)}, batch_stats={}, opt_state={})
           for c in (1, 2)}
  sums = {1: chunk_sums(part(1.0, [unit1, models.EXIT_HEAD], 2), jnp.ones(2), None),
          2: chunk_sums(part(4.0, [unit1, models.EXIT_HEAD, low], 1), jnp.full(1, 2.0), None)}
  _, out, _ = combine_sums(model, heads, sums)
  np.testing.assert_allclose(out[group_key(1)].params["w"], (2 * 1.0 + 2 * 4.0) / 4)
  np.testing.assert_allclose(out[group_key(2)].params["w"], 4.0)
  # only the deeper tier in the cohort: the head at cut 1 still learns from it
  _, out, _ = combine_sums(model, heads, {2: sums[2]})
  np.testing.assert_allclose(out[group_key(1)].params["w"], 4.0)
  sums[2] = chunk_sums(part(4.0, [unit1, models.EXIT_HEAD], 1), jnp.full(1, 2.0), None)
  _, out, _ = combine_sums(model, heads, sums)
  np.testing.assert_allclose(out[group_key(1)].params["w"], 1.0)


def test_every_exit_in_a_run():
  """A run with client_exits=every: a client at cut 7 of a (3, 7) fleet also
  trains an exit head at cut 3, every head moves and stays finite, the
  metrics are its own exit's; evaluated models carry only their own head.
  Refused for Sequential, and distill=deepest refused without it."""
  cfg = dataclasses.replace(CFG, client_exits="every", distill="deepest")
  _, sim = train_lib.build(cfg)
  assert sim.ctx.exit_cuts(7) == (3,) and sim.ctx.exit_cuts(3) == ()
  state = sim.init_state(jax.random.PRNGKey(0))
  before = state.exit_heads
  state, metrics = sim.algorithm.apply(state, sim.cohort(0, jax.random.PRNGKey(1)))
  assert np.isfinite(np.asarray(metrics)).all() and not sim.algorithm.nonfinite_parts(state)
  for g in before:
    assert not np.allclose(before[g].params["Dense_0"]["kernel"],
                           state.exit_heads[g].params["Dense_0"]["kernel"])
  for m in sim.algorithm.eval_models(state):
    assert models.exit_head_at(3) not in m.client.params
  with pytest.raises(ConfigError, match=r"^client_exits: 'every' has no effect in this config: it needs strategy=averaging"):
    dataclasses.replace(CFG, strategy="sequential", client_exits="every")
  with pytest.raises(ConfigError, match=r"^distill: 'deepest' has no effect in this config: it needs client_exits=every"):
    dataclasses.replace(CFG, distill="deepest")


def test_lower_exit_heads_learn_from_the_clients_own_data():
  """The split update with exit_cuts: a head at a lower cut learns, and the
  server's step is the one without it (the lower head is the client's alone)."""
  from hsee_jax.strategies import split_update
  net, tx = models.network("resnet18", 4, 0.125), optim.make_optimizer(CFG)
  _, sim = train_lib.build(CFG)
  key = jax.random.PRNGKey(0)
  p, s = net.init_span(key, *net.client_span(5), (16, 16, 3))
  hp, hs = net.init_exit_head(key, 3, (16, 16, 3))
  client = optim.init_part(tx, {**p, models.exit_head_at(3): hp}, s)
  server = optim.init_part(tx, *net.init_span(key, *net.server_span(5), (16, 16, 3)))
  xs = (np.arange(8, dtype=np.int32).reshape(1, 8),    # one step: the same activations
        np.float32([[0.05, 0.9, 5e-4, 1.0]]))
  from hsee_jax.engine import ClientRunner
  every = ClientRunner(split_update(net, 5, exit_cuts=(3,), preprocess=lambda k, x, m, sd: (
      x / 255.0 - m) / sd), "loop")
  (c1, s1), m1 = every.one(sim.ctx.train_set, (client, server, key), xs)
  assert not np.allclose(c1.params[models.exit_head_at(3)]["Dense_0"]["kernel"],
                         hp["Dense_0"]["kernel"])
  own = ClientRunner(split_update(net, 5, preprocess=lambda k, x, m, sd: (x / 255.0 - m) / sd),
                     "loop")
  plain = client.subset(net.client_names(5))
  (c2, s2), m2 = own.one(sim.ctx.train_set, (plain, server, key), xs)
  # the server learns the same from both (the lower head is the client's alone)
  chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-5, atol=1e-6)
  assert float(m1[1]) == pytest.approx(float(m2[1]), rel=1e-5)
  with pytest.raises(ValueError, match="exit_cuts: increasing cuts below 5"):
    split_update(net, 5, exit_cuts=(5,))


def test_proximal_term_pulls_toward_the_round_start():
  """prox_mu (FedProx): the first step is the plain one (w = w0, the term's
  gradient is 0); over more steps both parts stay closer to where the client
  began than without it, and a run with it trains; refused for Sequential
  and below 0."""
  from hsee_jax.engine import ClientRunner
  from hsee_jax.strategies import split_update
  from hsee_jax.variants import fedprox
  from hsee_jax.variants.fedprox import squared_distance
  net, tx = models.network("resnet18", 4, 0.125), optim.make_optimizer(CFG)
  _, sim = train_lib.build(CFG)
  key = jax.random.PRNGKey(0)
  client = optim.init_part(tx, *net.init_span(key, *net.client_span(3), (16, 16, 3)))
  server = optim.init_part(tx, *net.init_span(key, *net.server_span(3), (16, 16, 3)))
  norm = lambda k, x, m, sd: (x / 255.0 - m) / sd
  hp = [0.1, 0.0, 0.0, 1.0]
  after = {}
  for steps in (1, 4):
    xs = (np.arange(8 * steps, dtype=np.int32).reshape(steps, 8) % 96, np.float32([hp] * steps))
    for mu in (0.0, 5.0):
      runner = ClientRunner(split_update(net, 3, preprocess=norm, step_penalty=(
          fedprox.make(mu).step_penalty if mu else None)), "loop")
      (c, s_), m = runner.one(sim.ctx.train_set, (client, server, key), xs)
      assert np.isfinite(np.asarray(m)).all()
      after[steps, mu] = (float(squared_distance(c.params, client.params)),
                          float(squared_distance(s_.params, server.params)))
  assert after[1, 0.0] == after[1, 5.0]
  assert 0 < after[4, 5.0][0] < after[4, 0.0][0], after        # the client part
  assert 0 < after[4, 5.0][1] < 0.5 * after[4, 0.0][1], after  # the server part
  _, run = train_lib.build(dataclasses.replace(CFG, prox_mu=0.01))
  state, metrics = run.algorithm.apply(run.init_state(jax.random.PRNGKey(0)),
                                       run.cohort(0, jax.random.PRNGKey(1)))
  assert np.isfinite(np.asarray(metrics)).all() and not run.algorithm.nonfinite_parts(state)
  with pytest.raises(ConfigError, match=r"^prox_mu: 0.01 has no effect in this config: it needs strategy=averaging"):
    dataclasses.replace(CFG, strategy="sequential", prox_mu=0.01)
  with pytest.raises(ConfigError, match=r"^prox_mu: must be >= 0"):
    dataclasses.replace(CFG, prox_mu=-1.0)


def test_distillation_term():
  """distillation_loss is 0 when the student matches its teacher, positive
  otherwise, scales with T^2 and sends no gradient to the teacher; the
  objective adds it only with a weight (hp["distill_weight"]) and keeps the paper's loss
  when distill is none."""
  from hsee_jax.strategies.update import cross_entropy, exit_objective
  from hsee_jax.variants.distill import distillation_loss, make
  rng = np.random.default_rng(0)
  with_term = lambda teacher, t=1.0: (lambda *a: exit_objective()(*a) + make(teacher, t).penalty(*a))
  a, b = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(2))
  labels = jnp.arange(6) % 5
  assert float(distillation_loss(a, a, 3.0)) == pytest.approx(0.0, abs=1e-6)
  assert float(distillation_loss(a, b, 1.0)) > 0
  g_teacher = jax.grad(lambda t: distillation_loss(a, t, 2.0))(b)
  assert not np.asarray(g_teacher).any()
  hp = _named([0.1, 0.9, 0.0, 0.5, 0.0])
  plain = exit_objective()([a], b, labels, hp)
  assert float(plain) == float(0.5 * cross_entropy(a, labels))
  assert float(with_term("server")([a], b, labels, hp)) == float(plain)  # weight 0
  on = dict(hp, distill_weight=jnp.float32(2.0))
  assert float(with_term("server")([a], b, labels, on)) == pytest.approx(
      float(plain) + 2.0 * float(distillation_loss(a, b, 1.0)), rel=1e-6)
  deep = with_term("deepest", 3.0)([a, b], None, labels, on)
  assert float(deep) == pytest.approx(
      0.5 * (float(cross_entropy(a, labels)) + float(cross_entropy(b, labels))) / 2
      + 2.0 * float(distillation_loss(a, b, 3.0)), rel=1e-6)


def _named(values) -> dict:
  """A step's hyperparameters by name, as the client objective receives them
  (with the distillation variant's weight last)."""
  from hsee_jax.fleet import HPARAMS
  return dict(zip(HPARAMS + ("distill_weight",), jnp.float32(values)))


def test_rising_exit_weights():
  """exit_weights=rising: the k-th of a client's n exits weighs k / (1 + ...
  + n), the deepest most, times the exit-loss weight; one exit is the paper's
  loss either way; in a run it changes a several-exit client's training
  only; refused without client_exits=every or beside an objective of one's own."""
  from hsee_jax.strategies.update import cross_entropy, exit_objective
  from hsee_jax.variants.rising import objective as rising
  rng = np.random.default_rng(1)
  a, b, c = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32) for _ in range(3))
  labels = jnp.arange(6) % 5
  hp = _named([0.1, 0.9, 0.0, 0.5, 0.0])
  ce = [float(cross_entropy(x, labels)) for x in (a, b, c)]
  assert float(rising([a, b, c], None, labels, hp)) == pytest.approx(
      0.5 * (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6, rel=1e-6)
  assert float(rising([a], None, labels, hp)) == float(exit_objective()([a], None, labels, hp))
  metrics = {}
  for w in ("equal", "rising"):
    _, sim = train_lib.build(dataclasses.replace(CFG, client_exits="every", exit_weights=w))
    state = sim.init_state(jax.random.PRNGKey(0))
    state, m = sim.algorithm.apply(state, sim.cohort(0, jax.random.PRNGKey(1)))
    metrics[w] = np.asarray(m)
  assert metrics["equal"].shape == metrics["rising"].shape
  assert not np.array_equal(metrics["equal"], metrics["rising"])
  with pytest.raises(ConfigError, match=r"^exit_weights: 'rising' has no effect in this config: it needs client_exits=every"):
    dataclasses.replace(CFG, exit_weights="rising")
  with pytest.raises(ConfigError, match=r"^exit_weights: unknown value"):
    dataclasses.replace(CFG, client_exits="every", exit_weights="deep")
  with pytest.raises(train_lib.RunError, match=r"^objective: the variant every-exit\+rising replaces "):
    train_lib.build(dataclasses.replace(CFG, client_exits="every", exit_weights="rising"),
                    objective=exit_objective())


def test_distillation_weight_starts_at_its_round():
  """The distillation weight is a step input: 0 before distill_start (and
  without distill), the config's weight from that round on."""
  from hsee_jax import fleet
  cfg = dataclasses.replace(CFG, client_exits="every", distill="deepest", distill_weight=0.3,
                            distill_start=3, rounds=4)
  from hsee_jax import variants
  extra = variants.for_config(cfg).hparams
  assert [name for name, _ in extra] == ["distill_weight"]
  col = len(fleet.HPARAMS)
  weights = [fleet.step_hparams(cfg, r, [0.1, 0.1], extra)[:, col] for r in range(4)]
  np.testing.assert_array_equal(np.concatenate(weights), np.float32([0, 0, 0, 0, .3, .3, .3, .3]))
  assert fleet.step_hparams(CFG, 3, [0.1]).shape == (1, len(fleet.HPARAMS))   # no column without it
  with pytest.raises(ConfigError, match=r"^distill_start: "):
    dataclasses.replace(CFG, distill_start=0)
  with pytest.raises(ConfigError, match=r"^distill: unknown value"):
    dataclasses.replace(CFG, distill="teacher")


def test_static_bn_changes_only_what_is_evaluated():
  """static_bn: training is the same (metrics bit for bit); the evaluated
  network's batch statistics are the state's recomputed over the training
  data, its parameters the state's."""
  from hsee_jax.variants import static_bn
  runs = {}
  for on in (False, True):
    _, sim = train_lib.build(dataclasses.replace(CFG, static_bn=on))
    state = sim.init_state(jax.random.PRNGKey(0))
    state, metrics = sim.algorithm.apply(state, sim.cohort(0, jax.random.PRNGKey(1)))
    runs[on] = (sim, state, np.asarray(metrics))
  np.testing.assert_array_equal(runs[False][2], runs[True][2])
  sim, state, _ = runs[True]
  want = static_bn.recompute(sim.net, state.model, sim.ctx.train_set, CFG.seed)
  for m in sim.algorithm.eval_models(state):
    unit = models.unit_name(m.cut)
    chex.assert_trees_all_equal(m.client.params[unit], state.model.params[unit])
    chex.assert_trees_all_equal(m.client.batch_stats[unit], want.batch_stats[unit])
    assert not np.allclose(m.client.batch_stats[unit]["BatchNorm_0"]["mean"],
                           state.model.batch_stats[unit]["BatchNorm_0"]["mean"])
  assert static_bn.batch_indices(96, 0).shape == (static_bn.BATCHES, 96)
  with pytest.raises(ConfigError, match=r"^static_bn: True has no effect in this config: it needs strategy=averaging"):
    dataclasses.replace(CFG, strategy="sequential", static_bn=True)
