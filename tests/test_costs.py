import dataclasses
import math

import jax
import numpy as np
import pytest

from hsee_jax import costs, models

# the same network as the reproduce test's tiny archive, so the cost table is computed once
NET = models.SplitResNet18(num_classes=3, width=0.125)
SHAPE = (16, 16, 3)


@pytest.fixture(scope="module")
def table():
  return costs.cost_table(NET, SHAPE)


def test_parts_add_up_to_the_network(table):
  full, _ = NET.init_span(jax.random.PRNGKey(0), *NET.full_span(), SHAPE)
  n_full = sum(np.prod(a.shape) for a in jax.tree.leaves(full))
  for row in table:
    exit_head, _ = NET.init_span(jax.random.PRNGKey(0), 1, row["cut"], models.EXIT_HEAD, SHAPE)
    n_exit = sum(np.prod(a.shape) for a in jax.tree.leaves(exit_head["exit_head"]))
    assert row["client_params"] + row["server_params"] == n_full + n_exit
    h = NET.unit_output_shape(row["cut"], SHAPE)
    assert row["bytes_client_to_server"] == 4 * math.prod(h)
    assert row["bytes_server_to_client"] == 0


def test_flops_move_from_server_to_client_as_the_cut_deepens(table):
  client = [r["client_train_flops"] for r in table]
  server = [r["server_train_flops"] for r in table]
  assert all(a < b for a, b in zip(client, client[1:]))
  assert all(a > b for a, b in zip(server, server[1:]))
  assert all(r["client_peak_activation_bytes"] > 0 for r in table)
  # the whole training step is about 3x the forward pass: check the scale against the
  # analytic count of the convolutions' multiply-adds
  conv_macs = 0
  for k in range(1, 10):
    h, w, c = NET.unit_output_shape(k, SHAPE)
    cin = NET.input_shape(k, SHAPE)[-1]
    conv_macs += h * w * c * (9 * cin + (9 * c if k > 1 else 0))
    if k in (4, 6, 8):
      conv_macs += h * w * c * cin  # 1x1 shortcut
  total = table[0]["client_train_flops"] + table[0]["server_train_flops"]
  assert 2.0 * 2 * conv_macs < total < 4.5 * 2 * conv_macs


def test_gradient_back_costs_bytes():
  row = costs.cut_costs(NET, 4, SHAPE, server_grad_to_client=True)
  assert row["bytes_server_to_client"] == row["bytes_client_to_server"] > 0


def test_choose_cuts_takes_the_deepest_that_fits(table):
  b = 8
  need = [r["client_train_flops"] * b for r in table]
  budgets = [(need[2] * 1.01, 0), (need[6] * 1.01, 0), (0, 0),
             (0, costs.client_memory_bytes(table[4], b) * 1.01)]
  chosen = costs.choose_cuts(NET, SHAPE, budgets, b)
  assert [c["cut"] for c in chosen] == [3, 7, 8, 5]
  assert "cut 4 would need" in chosen[0]["reason"] and "FLOPs/step" in chosen[0]["reason"]
  assert "MiB" in chosen[3]["reason"]
  with pytest.raises(ValueError, match="client 0: no cut fits"):
    costs.choose_cuts(NET, SHAPE, [(need[0] / 2, 0)], b)


def test_simulated_round_sequential_waits_averaging_runs_in_parallel(table):
  t = {r["cut"]: r for r in table}
  args = dict(table=t, steps=10, batch_size=8, client_flops_per_s=(1e6, 1e6, 1e6),
              server_flops_per_s=1e12, link_bytes_per_s=1e9)
  seq = costs.simulated_round_seconds("sequential", (3, 5, 7), aggregate=False, **args)
  avg = costs.simulated_round_seconds("averaging", (3, 5, 7), aggregate=False, **args)
  # slow clients, fast server: sequential is the sum of the client times, averaging the max
  c = [80 * t[k]["client_train_flops"] / 1e6 for k in (3, 5, 7)]
  assert seq == pytest.approx(sum(c), rel=1e-3) and avg == pytest.approx(max(c), rel=1e-3)
  with_agg = costs.simulated_round_seconds("averaging", (3, 5, 7), aggregate=True, **args)
  assert with_agg == pytest.approx(avg + 2 * 4 * t[7]["client_params"] / 1e9, rel=1e-6)
  # Sequential with its client parts aggregated (client_aggregation) pays the same exchange
  seq_agg = costs.simulated_round_seconds("sequential", (3, 5, 7), aggregate=True, **args)
  assert seq_agg == pytest.approx(seq + 2 * 4 * t[7]["client_params"] / 1e9, rel=1e-6)


@pytest.mark.long
def test_config_budgets_choose_the_cuts(table, tmp_path):
  from hsee_jax import train as train_lib
  from hsee_jax.config import Config
  b = 8
  need = [r["client_train_flops"] * b for r in table]
  cfg = Config(dataset="synthetic", synthetic_shape=(16, 16, 3, 48, 12), width=0.125,
               batch_size=b, local_steps=1, rounds=1,
               client_budgets=((need[1] * 1.01, 0), (need[5] * 1.01, 0)))
  logs = []
  summary = train_lib.train(cfg, tmp_path, log=logs.append)
  assert summary["cuts"] == [2, 6]
  assert any("client 1: cut 6 needs" in line for line in logs)
  assert [c["cut"] for c in summary["test"]["cuts"]] == [2, 6]
  # the same budgets as device tiers of a fleet
  cfg = dataclasses.replace(cfg, client_budgets=(), num_clients=10,
                            budget_tiers=(((need[1] * 1.01, 0), 0.7), ((need[5] * 1.01, 0), 0.3)))
  _, sim = train_lib.build(cfg, log=logs.append)
  assert {c: len(ids) for c, ids in sim.fleet.groups.items()} == {2: 7, 6: 3}
  assert any("tier 1: cut 6 needs" in line for line in logs)


def test_run_cost_table_counts_the_variants(table):
  """A variant's exits (client_exits=every) add the lower exit heads' FLOPs
  and parameters to the client (nothing on the link); its downlink
  (distill=server) adds the float32 soft labels; the server's gradient is counted as before;
  forward_flops is the whole network's forward pass (under its training)."""
  from hsee_jax.config import Config
  rows = {r["cut"]: r for r in table}
  plain = costs.run_cost_table(Config(), NET, SHAPE, (7, 3, 5, 3))
  assert sorted(plain) == [3, 5, 7] and plain[5] == rows[5]
  from hsee_jax import variants
  both = Config(client_exits="every", distill="server")
  every = costs.run_cost_table(both, NET, SHAPE, (3, 5, 7), variant=variants.for_config(both))
  heads = costs._pieces(NET, SHAPE)
  for c, lower in ((3, ()), (5, (3,)), (7, (3, 5))):
    assert every[c]["client_train_flops"] == pytest.approx(
        rows[c]["client_train_flops"] + sum(heads[(models.EXIT_HEAD, x)]["flops"] for x in lower))
    assert every[c]["client_params"] == rows[c]["client_params"] + sum(
        heads[(models.EXIT_HEAD, x)]["params"] for x in lower)
    assert every[c]["bytes_client_to_server"] == rows[c]["bytes_client_to_server"]
    assert every[c]["bytes_server_to_client"] == 4 * NET.num_classes
  classical = costs.run_cost_table(Config(server_grad_to_client=True, exit_loss_weight=0.0),
                                   NET, SHAPE, (3,))
  assert classical[3]["bytes_server_to_client"] == rows[3]["bytes_client_to_server"]
  full_train = rows[3]["client_train_flops"] + rows[3]["server_train_flops"]
  assert 0.2 * full_train < costs.forward_flops(NET, SHAPE) < 0.6 * full_train
