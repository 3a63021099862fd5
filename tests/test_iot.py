"""The IoT fleet as it runs: device speeds, availability, round deadlines
(over-commitment, partial work), the compressed link, and the simulated
clock in the records."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsee_jax import costs, evaluation, fleet as fleet_lib, models, train
from hsee_jax.config import Config, ConfigError
from hsee_jax.data import load_dataset
from hsee_jax.engine import ClientRunner
from hsee_jax.link import Link
from hsee_jax.strategies import split_update, step_inputs

# three tiers of two clients: slow at cut 3, middling at 5, fast at 7
CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 10, 128, 64), width=0.0625,
             cuts=(3, 3, 5, 5, 7, 7), batch_size=8, local_steps=3, rounds=2, augment=False,
             eval_every=1, checkpoint_every=0, eval_batch_size=64,
             client_flops_per_s=(1e6, 1e6, 1e7, 1e7, 1e8, 1e8))


def _records(run) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_speeds_are_seeded_per_tier_and_lognormal_around_the_tiers_figure():
  cfg = Config(dataset="synthetic", synthetic_shape=(8, 8, 4, 4000, 8), width=0.0625,
               num_clients=2000, cut_tiers=((2, 0.5), (4, 0.5)), client_flops_per_s=(1e9, 1e11),
               client_link_bytes_per_s=(1e5, 1e7), speed_spread=0.5)
  data = load_dataset(cfg)
  a, b = fleet_lib.build_fleet(cfg, data), fleet_lib.build_fleet(cfg, data)
  np.testing.assert_array_equal(a.flops_per_s, b.flops_per_s)    # seeded
  np.testing.assert_array_equal(a.link_bytes_per_s, b.link_bytes_per_s)
  other = fleet_lib.build_fleet(dataclasses.replace(cfg, seed=1), data)
  assert not np.array_equal(a.flops_per_s, other.flops_per_s)
  for cut, flops, link in ((2, 1e9, 1e5), (4, 1e11, 1e7)):
    ids = a.groups[cut]
    assert abs(np.median(a.flops_per_s[ids]) / flops - 1) < 0.1      # the figure is the median
    assert abs(np.median(a.link_bytes_per_s[ids]) / link - 1) < 0.1
    assert abs(np.std(np.log(a.flops_per_s[ids])) - 0.5) < 0.05      # sigma = speed_spread
  exact = fleet_lib.build_fleet(dataclasses.replace(cfg, speed_spread=0.0), data)
  np.testing.assert_array_equal(exact.flops_per_s, np.where(exact.cuts == 2, 1e9, 1e11))
  assert len(a.describe()["flops_per_s"]) == 2000


def test_everyone_online_and_all_taking_part_is_todays_cohort():
  _, sim = train.build(dataclasses.replace(CFG, cuts=Config.cuts, num_clients=6, clients_per_round=4,
                                           cut_tiers=((3, 0.5), (7, 0.5)),
                                           client_flops_per_s=()))
  for rnd in range(5):
    t = fleet_lib.participants(sim.fleet, sim.cfg, rnd, sim.clock, 3)
    np.testing.assert_array_equal(t.ids, fleet_lib.sample_cohort(sim.cfg.seed, rnd, 6, 4))
    assert t.steps is None and not len(t.dropped) and not len(t.unused)


def test_availability_takes_clients_offline_seeded():
  cfg = dataclasses.replace(CFG, availability=0.5)
  online = [fleet_lib.online(cfg, r, 1000) for r in range(3)]
  assert all(400 < len(o) < 600 for o in online)
  np.testing.assert_array_equal(online[1], fleet_lib.online(cfg, 1, 1000))
  assert not np.array_equal(online[0][:50], online[1][:50])


def test_a_deadline_keeps_exactly_the_first_clients_that_fit():
  _, sim = train.build(dataclasses.replace(CFG, participation="deadline", deadline_s=5.0))
  clock, steps = sim.clock, sim.local_steps
  done = clock.client_seconds(np.arange(6), steps, True)
  t = fleet_lib.participants(sim.fleet, sim.cfg, 0, clock, steps)
  ids, dropped = t.ids, t.dropped
  np.testing.assert_array_equal(ids, np.flatnonzero(done <= 5.0))   # the cut-3 clients miss it
  np.testing.assert_array_equal(dropped, np.flatnonzero(done > 5.0))
  assert len(ids) == 4 and set(sim.fleet.cuts[dropped]) == {3}


def test_over_commitment_samples_more_and_keeps_the_cohort_size():
  cfg = dataclasses.replace(CFG, cuts=Config.cuts, num_clients=40, cut_tiers=((3, 0.25), (5, 0.25), (7, 0.5)),
                            client_flops_per_s=(1e6, 1e7, 1e8), clients_per_round=10,
                            participation="deadline", deadline_s=1000.0, overcommit=1.3)
  _, sim = train.build(cfg)
  done = sim.clock.client_seconds(np.arange(40), sim.local_steps, True)
  for rnd in range(4):
    t = fleet_lib.participants(sim.fleet, cfg, rnd, sim.clock, sim.local_steps)
    ids, unused = t.ids, t.unused
    assert len(ids) == 10 and len(unused) == 3 and not len(t.dropped)  # ceil(1.3 * 10) sampled
    assert done[ids].max() <= done[unused].min()                      # the first to finish kept


def test_tier_quotas_share_the_cohort_by_tier():
  cuts = np.array([3] * 7 + [5] * 7 + [7] * 6)
  assert fleet_lib.tier_quotas(cuts, 14) == {3: 5, 5: 5, 7: 4}      # 4.9 / 4.9 / 4.2
  assert fleet_lib.tier_quotas(cuts, 20) == {3: 7, 5: 7, 7: 6}
  assert fleet_lib.tier_quotas(cuts, 50) == {3: 7, 5: 7, 7: 6}      # never more than sampled
  assert fleet_lib.tier_quotas(np.array([3, 7, 7]), 1) == {3: 0, 7: 1}
  assert sum(fleet_lib.tier_quotas(cuts, 13).values()) == 13


def test_a_deadline_by_tier_keeps_each_tiers_share_the_first_of_each_tier():
  """Over-commitment with deadline_by_tier: 40 clients (10 slow at cut 3, 10
  at 5, 20 fast at 7), 13 sampled for a cohort of 10: the plain rule keeps
  the 10 fastest, so the slow tier trains only when too few others were
  sampled; by tier each cut keeps its share, its own fastest."""
  cfg = dataclasses.replace(CFG, cuts=Config.cuts, num_clients=40, cut_tiers=((3, 0.25), (5, 0.25), (7, 0.5)),
                            client_flops_per_s=(1e6, 1e7, 1e8), clients_per_round=10,
                            participation="deadline", deadline_s=1000.0, overcommit=1.3,
                            speed_spread=0.3)
  fair = dataclasses.replace(cfg, deadline_by_tier=True)
  _, sim = train.build(fair)
  done = sim.clock.client_seconds(np.arange(40), sim.local_steps, True)
  slow_plain = slow_fair = 0
  for rnd in range(6):
    t = fleet_lib.participants(sim.fleet, fair, rnd, sim.clock, sim.local_steps)
    ids, dropped = t.ids, np.concatenate([t.dropped, t.unused])
    p = fleet_lib.participants(sim.fleet, cfg, rnd, sim.clock, sim.local_steps)
    plain = p.ids
    sampled = np.sort(np.concatenate([ids, dropped]))
    np.testing.assert_array_equal(sampled, np.sort(np.concatenate([plain, p.dropped, p.unused])))
    quota = fleet_lib.tier_quotas(sim.fleet.cuts[sampled], 10)
    assert len(ids) == 10
    for c, q in quota.items():
      mine, gone = ids[sim.fleet.cuts[ids] == c], dropped[sim.fleet.cuts[dropped] == c]
      assert len(mine) == q                                           # the tier's share
      assert not len(gone) or done[mine].max() <= done[gone].min()    # its first to finish
    slow_plain += int(np.sum(sim.fleet.cuts[plain] == 3))
    slow_fair += int(np.sum(sim.fleet.cuts[ids] == 3))
  assert slow_fair > slow_plain
  # a client past the deadline is dropped whatever its tier's share
  tight = dataclasses.replace(fair, deadline_s=float(np.max(done[sim.fleet.cuts == 5])))
  ids = fleet_lib.participants(sim.fleet, tight, 0, sim.clock, sim.local_steps).ids
  assert not np.any(sim.fleet.cuts[ids] == 3) and np.all(done[ids] <= tight.deadline_s)


def test_partial_work_does_the_steps_that_fit():
  _, sim = train.build(dataclasses.replace(CFG, participation="partial", deadline_s=12.0))
  clock = sim.clock
  cohort = sim.cohort(0, jax.random.PRNGKey(0))
  want = np.minimum(3, np.floor((12.0 - clock.aggregate_s) / clock.step_s))
  np.testing.assert_array_equal(cohort.active.sum(1), want[cohort.ids])
  assert want[0] == 1 and want[5] == 3
  # each client's steps end at its own budget: the hparams' last column
  _, hp = step_inputs(cohort, np.arange(cohort.size))
  np.testing.assert_array_equal(hp[..., len(fleet_lib.HPARAMS)], cohort.active)
  assert cohort.sim_seconds <= 12.0


def test_a_masked_step_changes_nothing():
  """A client doing 1 of 3 steps ends where the same client ends after 1 step."""
  cfg = dataclasses.replace(CFG, cuts=(3,), client_flops_per_s=())
  data = load_dataset(cfg)
  _, sim = train.build(cfg, data)
  net, cut = sim.net, 3
  state = sim.init_state(jax.random.PRNGKey(0))
  cohort = sim.cohort(0, jax.random.PRNGKey(1))
  runner = ClientRunner(split_update(net, cut, preprocess=lambda k, x, m, s: (x / 255.0)), "loop")
  from hsee_jax.strategies.averaging import client_server_parts
  client, server = client_server_parts(state, cut, sim.ctx.tx)
  idx, hp = step_inputs(cohort, 0)
  mask = np.concatenate([hp, np.array([[1.0], [0.0], [0.0]], np.float32)], -1)
  (c3, s3), m3 = runner.one(sim.ctx.train_set, (client, server, cohort.keys[0]), (idx, mask))
  (c1, s1), m1 = runner.one(sim.ctx.train_set, (client, server, cohort.keys[0]), (idx[:1], hp[:1]))
  for a, b in zip(jax.tree.leaves((c3, s3, m3)), jax.tree.leaves((c1, s1, m1))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_round_nobody_makes_trains_nothing_and_the_run_goes_on(tmp_path):
  cfg = dataclasses.replace(CFG, participation="deadline", deadline_s=1e-6)
  train.train(cfg, tmp_path / "run", log=lambda s: None)
  rounds = [r for r in _records(tmp_path / "run") if "round" in r]
  assert len(rounds) == 2 and all(r["train"] == {} and r["train_per_client"] == [] for r in rounds)
  assert rounds[0]["dropped_per_cut"] == {"3": 2, "5": 2, "7": 2}
  assert rounds[0]["sim_seconds"] == 1e-6 and rounds[0]["bytes_sent"] == 0   # the server waited


@pytest.mark.long
def test_the_records_carry_the_simulated_clock_and_drops_per_tier(tmp_path):
  summary = train.train(dataclasses.replace(CFG, participation="deadline", deadline_s=5.0),
                        tmp_path / "run", log=lambda s: None)
  _, sim = train.build(CFG)
  rounds = [r for r in _records(tmp_path / "run") if "round" in r]
  for r in rounds:
    assert r["dropped_per_cut"] == {"3": 2, "5": 0, "7": 0}
    assert r["unused_per_cut"] == {"3": 0, "5": 0, "7": 0}
    assert r["sim_seconds"] == 5.0      # 4 of the 6 asked for came in time: the deadline
    # the cut-3 clients' first step takes 8.2 s: nothing of theirs was sent by then
    assert r["bytes_sent"] == sim.clock.round_bytes(np.arange(2, 6), 3, True) > 0
  # the run's totals in summary.json
  assert summary["sim_seconds"] == pytest.approx(sum(r["sim_seconds"] for r in rounds))
  assert summary["bytes_sent"] == sum(r["bytes_sent"] for r in rounds)


@pytest.mark.parametrize("kind", ["int8", "int8_channel"])
def test_int8_round_trip_error_is_within_half_its_scale(kind):
  h = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 8)) * jnp.arange(1, 9)
  out = Link(kind)(h)
  axes = (1, 2, 3) if kind == "int8" else (1, 2)
  scale = jnp.max(jnp.abs(h), axis=axes, keepdims=True) / 127
  assert bool(jnp.all(jnp.abs(out - h) <= scale / 2 * (1 + 1e-5)))
  assert float(jnp.max(jnp.abs(out - h))) > 0


def test_bfloat16_and_topk_links():
  h = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 5))
  np.testing.assert_array_equal(Link("bfloat16")(h), h.astype(jnp.bfloat16).astype(h.dtype))
  out = np.asarray(Link("topk", 0.1)(h)).reshape(3, -1)
  flat = np.asarray(h).reshape(3, -1)
  k = math.ceil(0.1 * 80)
  for row, src in zip(out, flat):
    kept = np.flatnonzero(row)
    assert len(kept) == k
    np.testing.assert_array_equal(row[kept], src[kept])
    assert np.abs(src[kept]).min() >= np.sort(np.abs(src))[-k]       # the largest magnitudes
  assert Link("none")(h) is h


def test_the_cost_table_counts_the_bytes_each_link_sends():
  net = models.SplitResNet18(10, width=0.125)
  shape = net.unit_output_shape(3, (32, 32, 3))
  n = math.prod(shape)
  want = {"none": 4 * n, "bfloat16": 2 * n, "int8": n + 4, "int8_channel": n + 4 * shape[-1],
          "topk": math.ceil(0.1 * n) * 8}
  for kind, nbytes in want.items():
    row = costs.cut_costs(net, 3, (32, 32, 3), link=None if kind == "none" else Link(kind))
    assert row["bytes_client_to_server"] == nbytes, kind
  cfg = Config(link="int8")
  assert costs.run_cost_table(cfg, net, (32, 32, 3), [3])[3]["bytes_client_to_server"] == n + 4


def test_a_compressed_link_is_crossed_at_each_cut_in_evaluation(tmp_path):
  data = load_dataset(CFG)
  _, plain = train.build(CFG, data)
  _, coarse = train.build(dataclasses.replace(CFG, link="topk", link_topk=0.02), data)
  state = plain.init_state(jax.random.PRNGKey(0))
  exact = plain.evaluate(state, data)
  lossy = coarse.evaluate(state, data)
  for a, b in zip(exact["cuts"], lossy["cuts"]):
    assert a["exit_acc"] == b["exit_acc"]          # the exits never cross the link
  # the full paths do, each at its own cut: the shared network scores alike
  # without compression and differently with it
  assert len({c["full_acc"]["mean"] for c in exact["cuts"]}) == 1
  logits = [evaluation.path_logits(coarse.net, [m.cut], [m.client], m.server, data.test_images,
                                   jnp.asarray(data.mean), jnp.asarray(data.std), 64, coarse.ctx.link)[1]
            for m in coarse.algorithm.eval_models(state)]
  assert not np.allclose(logits[0], logits[-1])


@pytest.mark.long
def test_a_compressed_link_changes_the_servers_training_only():
  """Training sees the link: the server's loss differs, the client's exit loss does not."""
  data = load_dataset(CFG)
  _, plain = train.build(CFG, data)
  _, coarse = train.build(dataclasses.replace(CFG, link="topk", link_topk=0.02), data)
  s1, m1, _ = plain.run_round(plain.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  s2, m2, _ = coarse.run_round(coarse.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  np.testing.assert_allclose(m1[:, 0], m2[:, 0], rtol=1e-5)
  assert not np.allclose(m1[:, 1], m2[:, 1])


@pytest.mark.parametrize("kw,msg", [
    (dict(participation="deadline"), "deadline_s: participation=deadline needs"),
    (dict(participation="sometimes"), "participation: unknown value"),
    (dict(availability=0.0), "availability: a probability"),
    (dict(overcommit=0.5), "overcommit:"),
    (dict(deadline_by_tier=True), "deadline_by_tier: True has no effect in this config: it needs "
     "participation=deadline"),
    (dict(link="fp4"), "link: unknown value"),
    (dict(link="int8", server_grad_to_client=True, exit_loss_weight=0.0), "link: compression"),
    (dict(link_topk=0.0), "link_topk:"),
    (dict(client_link_bytes_per_s=(1.0, 2.0)), "client_link_bytes_per_s: one entry per client"),
    (dict(speed_spread=-1.0), "speed_spread:"),
])
def test_bad_iot_settings_are_one_line_errors(kw, msg):
  with pytest.raises(ConfigError, match=msg) as e:
    dataclasses.replace(CFG, **kw)
  assert "\n" not in str(e.value)
