import dataclasses

import chex
import jax
import numpy as np
import pytest

from hsee_jax import strategies
from hsee_jax import train as train_lib
from hsee_jax.config import Config
from hsee_jax.engine import ClientRunner
from hsee_jax.optim import init_part
from hsee_jax.strategies import split_update, step_inputs
from hsee_jax.strategies.parts import stack_copies

CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 32), width=0.125,
             cuts=(4, 4), batch_size=8, local_steps=3, rounds=2, augment=True)


def _run(mode, scan_steps):
  _, sim = train_lib.build(dataclasses.replace(CFG, mode=mode))
  state = sim.init_state(jax.random.PRNGKey(0))
  params = {**state.model.params, "exit_head": state.exit_heads["cut_4"].params}
  stats = state.model.batch_stats
  part = lambda names: stack_copies(init_part(sim.ctx.tx, {n: params[n] for n in names},
                                               {n: stats[n] for n in names if n in stats}), 2)
  runner = ClientRunner(split_update(sim.net, 4), mode, scan_steps=scan_steps)
  cohort = sim.cohort(0, jax.random.PRNGKey(1))
  xs = step_inputs(cohort, np.arange(2))
  start = part(sim.net.client_names(4))
  (client, server), metrics = runner(sim.ctx.train_set, (start, part(sim.net.server_names(4)), cohort.keys), xs)
  return client, server, metrics, start


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
                         start.params["unit_1"]["Conv_0"]["kernel"])
  # the two clients saw different data, so they differ
  assert not np.allclose(client.params["exit_head"]["Dense_0"]["kernel"][0],
                         client.params["exit_head"]["Dense_0"]["kernel"][1])


@pytest.mark.parametrize("strategy,mode", [("averaging", "loop"),
                                           pytest.param("averaging", "vmap", marks=pytest.mark.long),
                                           ("sequential", "loop")])
def test_one_compilation_per_cut_and_none_after_first_round(strategy, mode):
  cfg = dataclasses.replace(CFG, cuts=(2, 7, 7, 2), strategy=strategy, mode=mode, rounds=3)
  strategies.clear_program_cache()   # earlier tests may have compiled the same programs
  _, sim = train_lib.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(1)
  state, _, _ = sim.run_round(state, 0, key)
  after_first = {c: r.num_traces for c, r in sim.runners.items()}
  assert sorted(sim.runners) == [2, 7]          # one runner per distinct cut, not per client
  assert all(n == 1 for n in after_first.values()), after_first
  for rnd in (1, 2):
    state, _, _ = sim.run_round(state, rnd, key)
  assert {c: r.num_traces for c, r in sim.runners.items()} == after_first


@pytest.mark.long
def test_sampled_cohorts_compile_once_per_cut_and_chunk_size():
  """Group sizes change every round with sampling; a chunk holds at most 2
  clients here, and each size (1, 2) compiles once per cut, then serves every
  round."""
  cfg = dataclasses.replace(CFG, cuts=Config.cuts, num_clients=24, cut_tiers=((2, 0.5), (6, 0.5)),
                            clients_per_round=7, client_chunk=2, mode="vmap",
                            local_steps=1, synthetic_shape=(16, 16, 4, 200, 32))
  strategies.clear_program_cache()
  _, sim = train_lib.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  for rnd in range(3):
    state, metrics, cohort = sim.run_round(state, rnd, jax.random.PRNGKey(1))
    assert metrics.shape == (7, 4) and np.isfinite(metrics).all()
  # one compiled step per chunk size (1 or 2) at most, per cut
  compiled = {c: r._step._cache_size() for c, r in sim.runners.items()}
  assert all(1 <= n <= 2 for n in compiled.values()), compiled
  for rnd in range(3, 5):
    state, _, _ = sim.run_round(state, rnd, jax.random.PRNGKey(1))
  assert all(n <= 2 for n in (r._step._cache_size() for r in sim.runners.values()))


def test_simulations_share_compiled_programs_by_program_fields():
  """A second simulation whose config differs only in inputs (seed, lr, the
  fleet) reuses the first one's compiled runners: nothing is traced again, and
  its results equal those of the same config compiled afresh. A field the
  programs read (augment) gets programs of its own."""
  strategies.clear_program_cache()
  base = dataclasses.replace(CFG, cuts=(2, 5), rounds=2, mode="loop")

  def one_round(cfg):
    _, sim = train_lib.build(cfg)
    state, metrics, _ = sim.run_round(sim.init_state(jax.random.PRNGKey(0)), 0,
                                      jax.random.PRNGKey(1))
    return sim, state, metrics
  first, _, _ = one_round(base)
  traced = {c: r.num_traces for c, r in first.runners.items()}
  other = dataclasses.replace(base, seed=3, lr=0.02, cuts=(5, 2, 2))
  second, state, metrics = one_round(other)
  assert all(second.runners[c] is first.runners[c] for c in (2, 5))
  assert {c: r.num_traces for c, r in second.runners.items()} == traced
  strategies.clear_program_cache()
  fresh, state2, metrics2 = one_round(other)
  assert fresh.runners[2] is not first.runners[2]
  np.testing.assert_array_equal(metrics, metrics2)
  chex.assert_trees_all_equal(state, state2)
  # momentum, weight decay and exit-loss weight are inputs too; augmentation is not
  _, third = train_lib.build(dataclasses.replace(other, exit_loss_weight=0.5, momentum=0.5,
                                                 weight_decay=1e-3))
  assert third.runners[2] is fresh.runners[2]
  _, fourth = train_lib.build(dataclasses.replace(other, augment=False))
  assert fourth.runners[2] is not fresh.runners[2]
  view = strategies.program_config(base)
  with pytest.raises(AttributeError):
    view.lr   # noqa: B018  (programs cannot read fields outside PROGRAM_FIELDS)


def test_auto_mode_follows_the_table_by_backend_precision_and_batch(monkeypatch):
  from hsee_jax import engine
  assert engine.resolve_mode("auto", "sequential") == "loop"
  assert engine.resolve_mode("loop", "averaging", precision="bfloat16") == "loop"
  assert engine.auto_mode("float32", 32, backend="cpu") == "unrolled"
  assert engine.auto_mode("bfloat16", 128, backend="gpu") == "loop"
  assert engine.auto_mode("float32", 128, backend="tpu") == "loop"
  # a table with a batch bound: small batches one way, larger ones another
  table = dict(engine.AUTO_MODE)
  table[("cpu", "bfloat16")] = ((32, "vmap"), (None, "loop"))
  table[("cpu", "float32")] = ((64, "loop"),)
  monkeypatch.setattr(engine, "AUTO_MODE", table)
  assert engine.resolve_mode("auto", precision="bfloat16", batch=32) == "vmap"
  assert engine.resolve_mode("auto", precision="bfloat16", batch=33) == "loop"
  assert engine.resolve_mode("auto", shard_clients=True, precision="bfloat16", batch=128) == "vmap"
  with pytest.raises(ValueError, match="no entry for batch 128"):
    engine.resolve_mode("auto", precision="float32", batch=128)
  # a run's context asks with its resolved precision and its batch size
  cfg = dataclasses.replace(CFG, precision="bfloat16", batch_size=8)
  assert train_lib.build(cfg)[1].ctx.mode == "vmap"
  assert train_lib.build(dataclasses.replace(cfg, precision="auto"))[1].ctx.mode == "loop"
