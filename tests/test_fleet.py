"""Fleets: the cohort sampler, tiers, chunked execution, state that scales
with the cohort, per-cut evaluation and exact resume with sampling."""
import dataclasses
import json
import shutil

import chex
import jax
import numpy as np
import pytest

from hsee_jax import train as train_lib
from hsee_jax.config import Config, ConfigError
from hsee_jax.engine import chunk_plan
from hsee_jax.fleet import assign_tiers, sample_cohort, tier_counts
from hsee_jax.strategies import step_inputs

CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 240, 32), width=0.125,
             batch_size=8, local_steps=1, rounds=3, augment=True, checkpoint_every=0)
FLEET = dataclasses.replace(CFG, num_clients=20, cut_tiers=((2, 0.5), (4, 0.3), (6, 0.2)),
                            clients_per_round=6, client_state="reset", partition="dirichlet",
                            dirichlet_alpha=0.3, client_chunk=2)


def test_sampler_is_seeded_uniform_without_repeats_and_pure():
  a = sample_cohort(3, 7, 100, 10)
  assert len(a) == 10 and len(set(a.tolist())) == 10 and (np.diff(a) > 0).all()
  assert a.min() >= 0 and a.max() < 100
  # a pure function of (seed, round): the same whatever was drawn before
  sample_cohort(3, 6, 100, 10)
  np.testing.assert_array_equal(a, sample_cohort(3, 7, 100, 10))
  assert not np.array_equal(a, sample_cohort(3, 8, 100, 10))
  assert not np.array_equal(a, sample_cohort(4, 7, 100, 10))
  # everyone, in id order, when C = N
  np.testing.assert_array_equal(sample_cohort(0, 5, 7, 7), np.arange(7))
  # uniform: over 2,000 rounds each of 50 clients is drawn about 2000 * 5 / 50 = 200 times
  counts = np.bincount(np.concatenate([sample_cohort(0, r, 50, 5) for r in range(2000)]),
                       minlength=50)
  chi2 = float(((counts - 200) ** 2 / 200).sum())
  assert chi2 < 90, chi2   # 49 degrees of freedom: p < 0.001 above 85.4


def test_tiers_give_exact_counts_in_a_seeded_order():
  assert tier_counts((0.5, 0.3, 0.2), 1000).tolist() == [500, 300, 200]
  assert tier_counts((1 / 3, 1 / 3, 1 / 3), 10).sum() == 10
  t = assign_tiers((0.5, 0.3, 0.2), 1000, seed=1)
  assert np.bincount(t).tolist() == [500, 300, 200]
  np.testing.assert_array_equal(t, assign_tiers((0.5, 0.3, 0.2), 1000, seed=1))
  assert not np.array_equal(t, assign_tiers((0.5, 0.3, 0.2), 1000, seed=2))


def test_chunk_plan_pads_only_large_sampled_rests_to_powers_of_two():
  assert chunk_plan(10, 4, pad=False) == [(4, 4), (4, 4), (2, 2)]
  assert chunk_plan(11, 4, pad=True) == [(4, 4), (4, 4), (3, 3)]   # 1..4 run exactly
  assert chunk_plan(3, 8, pad=True) == [(3, 3)]
  assert chunk_plan(5, 8, pad=True) == [(5, 8)]
  assert chunk_plan(21, 32, pad=True) == [(21, 32)]
  assert chunk_plan(37, 32, pad=True) == [(32, 32), (5, 8)]
  assert chunk_plan(21, 32, pad=False) == [(21, 21)]
  # every rest of a chunk of 32 lands on one of 7 sizes
  assert {chunk_plan(n, 32, pad=True)[-1][1] for n in range(1, 33)} == {1, 2, 3, 4, 8, 16, 32}


@pytest.mark.parametrize("kw,msg", [
    (dict(num_clients=10, cut_tiers=((3, 0.5), (5, 0.4))), "shares must sum to 1"),
    (dict(num_clients=10, cut_tiers=((3, 0.5), (9, 0.5))), "cut layer 9 out of range"),
    (dict(num_clients=10, cut_tiers=((3, 1.0),), clients_per_round=11), "more than the fleet"),
    (dict(num_clients=10, cut_tiers=((3, 1.0),), clients_per_round=0), "clients_per_round"),
    (dict(cut_tiers=((3, 1.0),)), "needs the fleet size"),
    (dict(num_clients=5), "cuts gives 3 clients"),
    (dict(num_clients=10, cut_tiers=((3, 1.0),), clients_per_round=4, aggregate_every=2),
     "aggregate_every > 1 with clients_per_round"),
    (dict(num_clients=10, cut_tiers=((3, 1.0),), clients_per_round=4, strategy="sequential",
          client_aggregation="cross_layer"), "client_aggregation=cross_layer with"),
    (dict(num_clients=10, cut_tiers=((3, 1.0),), client_flops_per_s=(1e9, 2e9)),
     "client_flops_per_s"),
    (dict(client_state="forget"), "client_state"),
])
def test_bad_fleet_configs_give_one_line_errors(kw, msg):
  with pytest.raises(ConfigError, match=msg) as e:
    Config(**kw)
  assert "\n" not in str(e.value)


def _train(cfg, out, **kw):
  return train_lib.train(cfg, out, log=lambda s: None, **kw)


def _records(out):
  return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _strip(rec):
  return {k: v for k, v in rec.items() if k not in ("seconds", "images_per_s")}


@pytest.mark.long
def test_every_client_per_round_is_the_default_bit_for_bit():
  out = {}
  for c in (-1, 4):
    _, sim = train_lib.build(dataclasses.replace(CFG, cuts=(2, 6, 2, 6), clients_per_round=c,
                                                 mode="loop"))
    state = sim.init_state(jax.random.PRNGKey(0))
    for rnd in range(2):
      state, metrics, cohort = sim.run_round(state, rnd, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(cohort.ids, np.arange(4))
    out[c] = (state, metrics)
  chex.assert_trees_all_equal(out[-1], out[4])


def _reference_round(sim, state_clients, state_servers, rnd, key):
  """Today's Averaging round written out with the reference pieces: every
  client's full client and server part stacked per cut, one call per cut,
  ``cross_layer_average`` over all of them."""
  from hsee_jax.strategies import cross_layer_average
  cohort = sim.cohort(rnd, key)
  metrics = np.zeros((cohort.size, 4), np.float32)
  for cut, ids in sim.fleet.groups.items():
    g = f"cut_{cut}"
    xs = step_inputs(cohort, ids)
    (state_clients[g], state_servers[g]), m = sim.runners[cut](
        sim.ctx.train_set, (state_clients[g], state_servers[g], cohort.keys[ids]), xs)
    metrics[ids] = np.asarray(m)
  parts = {**{f"client/{g}": p for g, p in state_clients.items()},
           **{f"server/{g}": p for g, p in state_servers.items()}}
  w = {f"{side}/cut_{c}": sim.fleet.data_sizes[ids] for c, ids in sim.fleet.groups.items()
       for side in ("client", "server")}
  out = jax.jit(cross_layer_average)(parts, w)
  return ({g: out[f"client/{g}"] for g in state_clients},
          {g: out[f"server/{g}"] for g in state_servers}, metrics)


@pytest.mark.long
def test_cohort_of_everyone_matches_the_reference_round():
  """C = N with the streaming, chunked Averaging equals the round written out
  with full per-client copies (the pre-fleet algorithm): same metrics, same
  models, to float32 rounding: the reference adds the same weighted sums in
  the same order, but as one program, which XLA fuses (and so rounds)
  differently from the per-chunk sums."""
  from hsee_jax.strategies import client_server_parts
  from hsee_jax.strategies.parts import stack_copies
  cfg = dataclasses.replace(CFG, cuts=(2, 4, 2, 6), mode="unrolled")
  _, sim = train_lib.build(cfg)
  key = jax.random.PRNGKey(1)
  state = sim.init_state(jax.random.PRNGKey(0))
  clients, servers = {}, {}
  for cut, ids in sim.fleet.groups.items():
    c, s = client_server_parts(state, cut, sim.ctx.tx)
    clients[f"cut_{cut}"], servers[f"cut_{cut}"] = stack_copies(c, len(ids)), stack_copies(s, len(ids))
  for rnd in range(2):
    clients, servers, ref_metrics = _reference_round(sim, clients, servers, rnd, key)
    state, metrics, _ = sim.run_round(state, rnd, key)
    np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5, atol=1e-6, err_msg=f"round {rnd}")
  for cut in sim.fleet.groups:
    g = f"cut_{cut}"
    for name, p in {**clients[g].params, **servers[g].params}.items():
      mine = state.exit_heads[g].params if name == "exit_head" else state.model.params[name]
      chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], p), mine, rtol=1e-5, atol=1e-6)


# two tiers: fewer compilations for the tests that train several times
FLEET2 = dataclasses.replace(FLEET, cut_tiers=((2, 0.6), (6, 0.4)))


@pytest.mark.long
def test_chunked_equals_unchunked_with_sampling():
  """Chunks of 2 against one chunk per cut (16, whose rests of 5..8 clients
  are padded to 8 with zero-weight clients): the same training; the sums are
  formed in another order, so to float32 rounding."""
  cfg = dataclasses.replace(FLEET2, clients_per_round=12, mode="vmap")
  outs = {}
  for chunk in (2, 16):
    _, sim = train_lib.build(dataclasses.replace(cfg, client_chunk=chunk))
    state = sim.init_state(jax.random.PRNGKey(0))
    padded = 0
    for rnd in range(2):
      state, metrics, cohort = sim.run_round(state, rnd, jax.random.PRNGKey(1))
      padded += sum(k - real for c in np.unique(cohort.cuts)
                    for real, k in chunk_plan(int((cohort.cuts == c).sum()), chunk, pad=True))
    outs[chunk] = (state, metrics, padded)
  assert outs[2][2] == 0 and outs[16][2] > 0   # the one-chunk run did train padding clients
  chex.assert_trees_all_close(outs[2][0], outs[16][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs[2][1], outs[16][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy,state_kw,per_client", [
    ("averaging", dict(client_state="reset"), "none"),
    ("averaging", dict(client_state="keep"), "optimiser"),
    ("sequential", dict(client_state="keep"), "client part"),
])
def test_persistent_state_grows_only_by_the_per_client_state(strategy, state_kw, per_client):
  sizes = {}
  for n in (12, 48):
    cfg = dataclasses.replace(CFG, cuts=tuple((2, 4, 6)[i % 3] for i in range(n)),
                              strategy=strategy, clients_per_round=6, **state_kw)
    _, sim = train_lib.build(cfg)
    shapes = sim.abstract_state()
    sizes[n] = (sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes)),
                sim.algorithm.per_client_bytes)
  (small, per), (big, _) = sizes[12], sizes[48]
  assert big - small == sum(per[c] * 12 for c in (2, 4, 6))
  if per_client == "none":
    assert big == small and set(per.values()) == {0}
  else:
    assert all(b > 0 for b in per.values())
    assert per[6] > per[2]   # deeper client parts (and exit heads on wider units) cost more


def test_averaging_evaluates_once_per_cut_and_sequential_a_seeded_sample():
  _, sim = train_lib.build(FLEET)
  models = sim.algorithm.eval_models(sim.init_state(jax.random.PRNGKey(0)))
  assert [m.cut for m in models] == [2, 4, 6] and all(m.one_network for m in models)
  assert sum(len(m.clients) for m in models) == 20
  _, sim = train_lib.build(dataclasses.replace(FLEET, strategy="sequential", mode="loop",
                                               eval_clients=2))
  models = sim.algorithm.eval_models(sim.init_state(jax.random.PRNGKey(0)))
  assert [m.cut for m in models] == [2, 2, 4, 4, 6, 6] and not any(m.one_network for m in models)
  again = sim.algorithm.eval_models(sim.init_state(jax.random.PRNGKey(0)))
  assert [m.clients for m in models] == [m.clients for m in again]


@pytest.mark.long
@pytest.mark.parametrize("strategy", ["averaging", "sequential"])
def test_fleet_run_resumes_exactly_with_sampling(tmp_path, strategy):
  cfg = dataclasses.replace(FLEET2, strategy=strategy, checkpoint_every=1, eval_clients=2,
                            mode="loop", client_state="keep")
  straight = _train(cfg, tmp_path / "straight")
  part = tmp_path / "part"
  shutil.copytree(tmp_path / "straight", part)
  shutil.rmtree(part / "checkpoints" / "3")
  shutil.rmtree(part / "checkpoints" / "2")
  resumed = _train(cfg, part, resume=True)
  assert resumed["resumed_from_round"] == 1
  assert [_strip(r) for r in _records(tmp_path / "straight")] == [_strip(r) for r in _records(part)]
  assert straight["test"] == resumed["test"]
  test = straight["test"]
  assert [c["cut"] for c in test["cuts"]] == [2, 6]
  for c in test["cuts"]:
    assert c["exit_acc"]["min"] <= c["exit_acc"]["mean"] <= c["exit_acc"]["max"]
  # every round trained 6 distinct clients of the 20
  for r in _records(part):
    ids = [c["client"] for c in r["train_per_client"]]
    assert len(set(ids)) == 6 and max(ids) < 20
  fleet = json.loads((part / "fleet.json").read_text())
  assert fleet["clients_per_cut"] == {"2": 12, "6": 8}
