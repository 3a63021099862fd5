"""Mixed precision (``Config.precision``): bfloat16 compute, float32 state."""
import dataclasses
import json
import shutil
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsee_jax import costs, models, precision, rundir
from hsee_jax import train as train_lib
from hsee_jax.checkpoint import Checkpointer
from hsee_jax.config import Config, ConfigError, from_dict

SYNTH = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 40), width=0.125,
               cuts=(2, 6), batch_size=8, local_steps=3, rounds=3, eval_batch_size=16,
               exit_thresholds=(0.0, 0.5, 1.0), schedule="constant", checkpoint_every=1,
               augment=False)


class _Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(not train, momentum=0.9)(nn.Conv(self.features, (3, 3))(x))
    return nn.relu(nn.Dense(self.features)(x))


@dataclasses.dataclass(frozen=True)
class _OwnNet(models.SplitNetwork):   # a network written against SplitNetwork
  name: ClassVar[str] = "own"
  num_units: ClassVar[int] = 3

  def unit(self, k):
    return _Block(4 * k)


def test_precision_values():
  assert precision.resolve("auto", "cpu") == "float32"
  assert precision.resolve("auto", "gpu") == precision.resolve("auto", "tpu") == "bfloat16"
  assert precision.resolve("bfloat16", "cpu") == "bfloat16"
  assert Config().precision == "auto" and models.for_config(Config(), 10).precision == "float32"
  with pytest.raises(ConfigError) as e:
    Config(precision="float16")
  assert str(e.value) == "precision: unknown value 'float16'; expected one of float32, bfloat16, auto"
  # a saved config from before the field ran in float32 (and resumes in it)
  old = {k: v for k, v in Config().to_dict().items() if k != "precision"}
  assert from_dict(old).precision == "float32"


def _split_pass(net, x, cut=2):
  """Client then server part of ``net`` at ``cut``: (what the client sends,
  exit logits, final logits, gradients, batch statistics), traced only."""
  key = jax.random.PRNGKey(0)
  client = net.init_span(key, *net.client_span(cut), x.shape[1:])
  server = net.init_span(key, *net.server_span(cut), x.shape[1:])

  def loss(c, s):
    exits, logits, c_stats, s_stats = net.split_forward([c], s, x, [cut], train=True)
    return jnp.mean(exits[0] ** 2) + jnp.mean(logits ** 2), (exits[0], logits, c_stats, s_stats)

  def run(c, s):
    (_, (e, logits, cs, ss)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(c, s)
    h = net.apply_span(*c, x, 1, cut, None, train=False)[0]
    return h, e, logits, grads, (cs, ss)
  return run, client, server


@pytest.mark.parametrize("name", list(models.NETWORKS) + ["own"])
def test_every_network_computes_in_bfloat16_with_float32_state(name):
  """Every network, shipped or written against SplitNetwork, follows the
  policy (checked on the traced dtypes: nothing is computed)."""
  net = (_OwnNet(10, 1.0, "linear", "bfloat16") if name == "own" else
         models.network(name, 10, 0.125, precision="bfloat16"))
  run, client, server = _split_pass(net, jnp.zeros((2, 16, 16, 3)))
  h, exit_logits, logits, grads, stats = jax.eval_shape(run, client, server)
  assert h.dtype == jnp.bfloat16                       # what the client sends the server
  assert exit_logits.dtype == logits.dtype == jnp.float32   # losses and entropies
  dtypes = {a.dtype for a in jax.tree.leaves((grads, stats))}
  assert dtypes == {jnp.dtype(jnp.float32)}            # gradients, batch statistics
  # and the program does run in bfloat16: its convolutions take bfloat16 operands
  convs = [l for l in jax.jit(run).lower(client, server).as_text().splitlines()
           if "convolution" in l]
  assert convs and all("bf16" in l for l in convs), convs[:3]


def test_bfloat16_logits_near_float32():
  """The same weights in both precisions give nearby outputs (bfloat16 keeps 8 bits)."""
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  out = {}
  for p in ("float32", "bfloat16"):
    run, client, server = _split_pass(models.network("resnet18", 10, 0.125, precision=p), x)
    out[p] = jax.jit(run)(client, server)
  for i in (1, 2):   # exit and final logits
    ref = out["float32"][i]
    np.testing.assert_allclose(out["bfloat16"][i], ref, atol=0.05 * float(jnp.max(jnp.abs(ref))))
  assert out["float32"][0].dtype == jnp.float32


def test_cost_table_counts_activations_in_the_compute_dtype():
  rows = {p: costs.cost_table(models.network("resnet18", 10, 0.125, precision=p), (32, 32, 3))
          for p in ("float32", "bfloat16")}
  for a, b in zip(rows["float32"], rows["bfloat16"]):
    assert b["bytes_client_to_server"] * 2 == a["bytes_client_to_server"]
    assert b["client_params"] == a["client_params"] and b["server_params"] == a["server_params"]
    assert b["client_peak_activation_bytes"] < a["client_peak_activation_bytes"]
  # the simulated clock's upload shrinks with them
  t = {p: costs.simulated_round_seconds("averaging", [3], {r["cut"]: r for r in rows[p]}, 10, 32,
                                        [1e10], 1e13, 1.25e6) for p in rows}
  assert t["bfloat16"] < t["float32"]


def _records(run):
  return [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "images_per_s")}
          for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.long
def test_bfloat16_run_trains_resumes_exactly_and_evaluates(tmp_path):
  bf16 = dataclasses.replace(SYNTH, precision="bfloat16")
  summary = train_lib.train(bf16, tmp_path / "bf16", log=lambda s: None)
  train_lib.train(dataclasses.replace(SYNTH, precision="float32"), tmp_path / "f32",
                  log=lambda s: None)
  loss = {p: [r["train"]["full_loss"] for r in _records(tmp_path / p) if "train" in r]
          for p in ("bf16", "f32")}
  exit_loss = {p: [r["train"]["exit_loss"] for r in _records(tmp_path / p) if "train" in r]
               for p in ("bf16", "f32")}
  # bfloat16 lowers the loss as float32 does: both fall, and stay within 0.1 of each other
  for p in loss:
    assert loss[p][-1] < loss[p][0] and exit_loss[p][-1] < exit_loss[p][0]
  assert np.max(np.abs(np.subtract(loss["bf16"], loss["f32"]))) < 0.1, loss
  assert loss["bf16"] != loss["f32"]   # it did compute in another precision
  # parameters, optimiser state and batch statistics stay float32, in the checkpoint too
  _, strategy = train_lib.build(bf16)
  with Checkpointer(tmp_path / "bf16" / "checkpoints", create=False) as ck:
    state, meta = rundir.restore_state(strategy.abstract_state(), ck, bf16)
  floats = {a.dtype for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)}
  assert meta["round"] == 3 and floats == {jnp.dtype(jnp.float32)}
  # evaluation and the early-exit table
  test = summary["test"]
  assert [c["cut"] for c in test["cuts"]] == [2, 6]
  for c in test["cuts"]:
    ee = c["early_exit"]
    assert [e["threshold"] for e in ee] == [0.0, 0.5, 1.0]
    assert ee[0]["client_fraction"] == 0.0 and ee[-1]["client_fraction"] == 1.0
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in ee)
  # resumed from its checkpoint after round 2, a bfloat16 run gives the straight run bit for bit
  half = tmp_path / "half"
  shutil.copytree(tmp_path / "bf16", half)
  shutil.rmtree(half / "checkpoints" / "3")
  (half / "summary.json").unlink()
  lines = (half / "metrics.jsonl").read_text().splitlines()
  (half / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
  again = train_lib.train(bf16, half, resume=True, log=lambda s: None)
  assert _records(half) == _records(tmp_path / "bf16")
  assert again["test"] == summary["test"]
