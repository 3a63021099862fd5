"""The client axis laid over a device mesh gives the single-device result.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4,
since the device count is fixed when JAX starts."""
import subprocess
import sys
from pathlib import Path

import pytest

from hsee_jax import distributed

pytestmark = pytest.mark.long  # run by .ci/run after the default run

SCRIPT = r'''
import dataclasses, jax, numpy as np
assert jax.device_count() == 4, jax.devices()
from hsee_jax import train as train_lib
from hsee_jax.config import Config
cfg = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 128, 16), width=0.125,
             cuts=(3, 3, 3, 3, 6, 6, 6, 6, 6), batch_size=8, local_steps=2, rounds=2,
             augment=True, mode="vmap", client_chunk=4)
_, sim = train_lib.build(cfg)                       # seed 0 alone, one device
one = sim.init_state(jax.random.PRNGKey(0))
for r in range(2):
  one, m1, _ = sim.run_round(one, r, jax.random.PRNGKey(1))
# sharded: the client axis laid over the mesh: per round, cut 3 one chunk of 4
# clients (over the mesh), cut 6 one of 4 (over the mesh) and one of 1 (replicated)
_, sharded = train_lib.build(dataclasses.replace(cfg, shard_clients=True))
two = sharded.init_state(jax.random.PRNGKey(0))
for r in range(2):
  two, m2, _ = sharded.run_round(two, r, jax.random.PRNGKey(1))
assert sharded.ctx.mesh.sharded_chunks == 4, sharded.ctx.mesh.sharded_chunks
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
np.testing.assert_allclose(m1, m2, rtol=1e-4, atol=1e-5)
print("SHARDING-OK")
'''


def test_sharded_clients_match_single_device():
  env = distributed.cpu_env(4)
  r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                     cwd=Path(__file__).resolve().parents[1], timeout=600)
  assert r.returncode == 0 and "SHARDING-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
