"""The fused, donated client program (engine.ClientRunner.chunk_program):
what a round dispatches, counted, and what a chunk donates.

Compiled calls are counted by sending every jitted call down JAX's Python
dispatch path (no C++ fast path) and counting the executions there
(:func:`executions`); the caches are cleared first so that nothing compiled
earlier in the process slips past the count.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import pjit as pjit_src
from jax._src.interpreters import pxla

from hsee_jax import engine, strategies, train
from hsee_jax.config import Config
from hsee_jax.engine import ClientRunner, ClientUpdate

STEPS = 3


@pytest.fixture
def executions(monkeypatch):
  """The names of the compiled programs executed from now on, in order."""
  names = []
  run = pxla.ExecuteReplicated.__call__

  def counted(self, *args):
    names.append(self.name)
    return run(self, *args)

  monkeypatch.setattr(pjit_src, "_get_fastpath_data", lambda *a, **k: None)
  monkeypatch.setattr(pxla.ExecuteReplicated, "__call__", counted)
  jax.clear_caches()
  strategies.clear_program_cache()
  yield names
  strategies.clear_program_cache()  # the runners built here scan their steps


def _round_calls(monkeypatch, names, mode: str, scan_steps: bool) -> tuple[list, list]:
  """The compiled calls of two rounds of an Averaging fleet at cuts 3, 3, 5,
  5 in chunks of 2 (one chunk per cut), after a first round that compiles."""
  monkeypatch.setattr(engine, "ClientRunner", functools.partial(ClientRunner, scan_steps=scan_steps))
  cfg = Config(dataset="synthetic", synthetic_shape=(16, 16, 10, 64, 16), width=0.0625,
               cuts=(3, 3, 5, 5), batch_size=8, local_steps=STEPS, rounds=3, augment=False,
               mode=mode, client_chunk=2, schedule="constant", client_state="keep")
  _, sim = train.build(cfg)
  state = sim.init_state(jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(1)
  state, _, _ = sim.run_round(state, 0, key)
  rounds = []
  for rnd in (1, 2):
    names.clear()
    before = jax.tree.leaves(state.clients)
    state, _, _ = sim.run_round(state, rnd, key)
    rounds.append(list(names))
  return rounds, before


@pytest.mark.parametrize("mode", ["vmap", pytest.param("unrolled", marks=pytest.mark.long)])
def test_a_round_dispatches_one_call_per_chunk_plus_the_aggregation(executions, monkeypatch, mode):
  rounds, kept = _round_calls(monkeypatch, executions, mode, scan_steps=True)
  for calls in rounds:
    # the cohort's keys, one program per chunk (two chunks), the aggregation
    assert calls == ["jit(_client_keys)", "jit(chunk)", "jit(chunk)", "jit(combine_sums)"], calls
  # the per-client store of the round before was donated to the chunk programs
  assert kept and all(leaf.is_deleted() for leaf in kept)


@pytest.mark.long
def test_with_the_host_loop_over_steps_init_and_final_are_fused(executions, monkeypatch):
  rounds, _ = _round_calls(monkeypatch, executions, "unrolled", scan_steps=False)
  chunk = ["jit(chunk_begin)"] + ["jit(g)"] * STEPS + ["jit(chunk_end)"]
  assert rounds[-1] == ["jit(_client_keys)", *chunk, *chunk, "jit(combine_sums)"], rounds[-1]


def _toy_update() -> ClientUpdate:
  """A client update on a scalar: ``state -> state + sum of its inputs * w``."""
  return ClientUpdate(init=lambda common, state: state,
                      step=lambda common, carry, x: carry + x * common,
                      final=lambda common, carry: carry * 2.0)


@pytest.mark.parametrize("mode,scan_steps", [("vmap", True), ("vmap", False), ("unrolled", True),
                                             ("loop", False), ("debug", False)])
def test_a_chunk_program_equals_its_parts_and_deletes_what_it_owns(mode, scan_steps):
  runner = ClientRunner(_toy_update(), mode, scan_steps=scan_steps)
  prepare = lambda read, owned: owned[read]        # the chunk's clients from the store
  finish = lambda out, read, owned: owned.at[read].set(out)
  program = runner.chunk_program(prepare, finish)
  store = jnp.arange(6, dtype=jnp.float32)
  slots = np.array([4, 1])
  xs = np.arange(2 * STEPS, dtype=np.float32).reshape(2, STEPS)
  expected = np.array(store).copy()
  expected[slots] = 2.0 * (expected[slots] + 0.5 * xs.sum(axis=1))
  out = program(jnp.float32(0.5), slots, store, xs)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)
  if mode != "debug":  # nothing is compiled, so nothing is donated
    assert store.is_deleted()
