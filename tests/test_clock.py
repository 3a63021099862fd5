"""The simulated clock as docs/usage.md ("The simulated clock") defines it,
each case computed by hand from the cost table; speeds per client or per
tier; the one rule for companion fields; bounds that keep every figure
finite; a full disk at every write; what the run's header says."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from hsee_jax import cli, costs, fleet as fleet_lib, rundir, train, writers
from hsee_jax import config as config_lib
from hsee_jax.checkpoint import Checkpointer
from hsee_jax.config import Config, ConfigError
from hsee_jax.data import load_dataset

# three tiers of two clients: slow at cut 3, middling at 5, fast at 7; a
# fast server, so the clients set the pace
CFG = Config(dataset="synthetic", synthetic_shape=(16, 16, 10, 128, 64), width=0.0625,
             cuts=(3, 3, 5, 5, 7, 7), batch_size=8, local_steps=3, rounds=2, augment=False,
             eval_every=1, checkpoint_every=0, eval_batch_size=64,
             client_flops_per_s=(1e6, 1e6, 1e7, 1e7, 1e8, 1e8))


def _by_hand(sim):
  """Each client's step, transfer and bytes from the cost table (docs/usage.md's rule)."""
  cfg, table = sim.cfg, costs.run_cost_table(sim.cfg, sim.net, sim.ctx.image_shape, sim.fleet.cuts,
                                                    variant=sim.ctx.variant)
  rows = [table[int(c)] for c in sim.fleet.cuts]
  step_bytes = np.array([cfg.batch_size * (r["bytes_client_to_server"] + r["bytes_server_to_client"])
                         for r in rows])
  link = sim.fleet.link_bytes_per_s   # each client's bandwidth (drawn around link_bytes_per_s)
  step_s = np.array([cfg.batch_size * r["client_train_flops"] for r in rows]) / sim.fleet.flops_per_s \
      + step_bytes / link
  agg_bytes = np.array([8.0 * r["client_params"] for r in rows])
  server_s = np.array([cfg.batch_size * r["server_train_flops"] for r in rows]) / cfg.server_flops_per_s
  return step_s, agg_bytes / link, step_bytes, agg_bytes, server_s


def _cohort(cfg, rnd=0):
  _, sim = train.build(cfg)
  return sim, sim.cohort(rnd, jax.random.PRNGKey(0))


def test_speeds_are_per_client_with_n_values_and_per_tier_with_t_values():
  tiered = dict(num_clients=4, cut_tiers=((3, 0.5), (7, 0.5)), cuts=Config.cuts)
  data = load_dataset(CFG)
  per_client = dataclasses.replace(CFG, **tiered, client_flops_per_s=(1e6, 2e6, 3e6, 4e6),
                                   client_link_bytes_per_s=(1e5, 2e5, 3e5, 4e5))
  fleet = fleet_lib.build_fleet(per_client, data)
  np.testing.assert_array_equal(fleet.flops_per_s, [1e6, 2e6, 3e6, 4e6])   # client i gets entry i
  np.testing.assert_array_equal(fleet.link_bytes_per_s, [1e5, 2e5, 3e5, 4e5])
  per_tier = dataclasses.replace(per_client, client_flops_per_s=(1e6, 1e8),
                                 client_link_bytes_per_s=(1e5, 1e7))
  fleet = fleet_lib.build_fleet(per_tier, data)
  np.testing.assert_array_equal(fleet.flops_per_s, np.where(fleet.cuts == 3, 1e6, 1e8))
  np.testing.assert_array_equal(fleet.link_bytes_per_s, np.where(fleet.cuts == 3, 1e5, 1e7))
  with pytest.raises(ConfigError, match=r"^client_flops_per_s: one entry per client or tier "
                                        r"\(4 clients or 2 tiers\), got 3$"):
    dataclasses.replace(per_client, client_flops_per_s=(1e6, 2e6, 3e6))
  with pytest.raises(ConfigError, match=r"^client_flops_per_s: 2 entries for 2 clients in 2 "
                                        r"tiers is ambiguous"):
    dataclasses.replace(per_tier, num_clients=2)


def test_a_deadline_fewer_than_c_make_lasts_until_the_deadline():
  """Cut-3 clients miss a 10 s deadline: 4 of the 6 asked for come in time,
  so the server waits until the deadline; the late ones' steps done by then
  were sent."""
  sim, cohort = _cohort(dataclasses.replace(CFG, participation="deadline", deadline_s=10.0))
  step_s, agg_s, step_bytes, agg_bytes, _ = _by_hand(sim)
  done = 3 * step_s + agg_s
  assert (done[:2] > 10.0).all() and (done[2:] <= 10.0).all()
  np.testing.assert_array_equal(cohort.ids, [2, 3, 4, 5])
  np.testing.assert_array_equal(cohort.dropped, [0, 1])
  assert not len(cohort.unused)
  assert cohort.sim_seconds == 10.0
  late_steps = np.minimum(3, np.floor(10.0 / step_s[:2] + 1e-9))
  assert 0 < late_steps.sum() < 6
  want = np.sum(3 * step_bytes[2:] + agg_bytes[2:]) + np.sum(late_steps * step_bytes[:2])
  assert cohort.bytes_sent == int(round(want))


def test_nobody_in_time_costs_the_deadline_and_the_steps_sent():
  cfg = dataclasses.replace(CFG, participation="deadline", deadline_s=1.0)
  sim, cohort = _cohort(cfg)
  step_s, agg_s, step_bytes, _, _ = _by_hand(sim)
  deadline = float(np.min(3 * step_s + agg_s)) * 0.99
  sim, cohort = _cohort(dataclasses.replace(cfg, deadline_s=deadline))
  assert cohort.size == 0 and len(cohort.dropped) == 6
  assert cohort.sim_seconds == deadline
  sent = np.minimum(3, np.floor(deadline / step_s + 1e-9)) * step_bytes
  assert cohort.bytes_sent == int(round(sent.sum())) > 0


def test_partial_work_sums_each_clients_compute_and_transfer_and_keeps_the_deadline():
  """A slow, small client at cut 3 (long compute, short transfer) and a fast,
  large one at cut 7 on a slow link (short compute, long transfer): the
  round is the later of the two clients' own sums, within the deadline; the
  longest compute plus the longest transfer would overrun it."""
  cfg = dataclasses.replace(CFG, cuts=(3, 7), client_flops_per_s=(2e6, 1e9),
                            client_link_bytes_per_s=(1e7, 2e5))
  _, sim = train.build(cfg)
  step_s, agg_s, *_ = _by_hand(sim)
  assert step_s[0] > step_s[1] and agg_s[1] > agg_s[0]
  deadline = float(max(3 * step_s[0] + agg_s[0], 3 * step_s[1] + agg_s[1]) * 1.01)
  sim, cohort = _cohort(dataclasses.replace(cfg, participation="partial", deadline_s=deadline))
  assert cohort.size == 2 and cohort.active.all()           # everyone does all 3 steps
  want = max(3 * step_s[0] + agg_s[0], 3 * step_s[1] + agg_s[1])
  assert cohort.sim_seconds == pytest.approx(want, rel=1e-12) and cohort.sim_seconds <= deadline
  assert 3 * step_s[0] + agg_s[1] > deadline                # the sum across clients overruns
  # a client that cannot fit one step is dropped, sends nothing, and the server waits for it
  tight = float(3 * step_s[1] + agg_s[1]) * 1.01
  sim, cohort = _cohort(dataclasses.replace(cfg, participation="partial", deadline_s=tight))
  assert step_s[0] + agg_s[0] > tight
  np.testing.assert_array_equal(cohort.ids, [1])
  np.testing.assert_array_equal(cohort.dropped, [0])
  assert cohort.sim_seconds == tight


def test_averaging_and_sequential_rounds_by_hand():
  """Averaging: the later of the last client's own sum and the server's
  work; Sequential: the turns in order, then the exchange of client parts."""
  for strategy, extra in (("averaging", {}), ("sequential", {"client_aggregation": "cross_layer"})):
    sim, cohort = _cohort(dataclasses.replace(CFG, strategy=strategy, mode="loop", **extra))
    step_s, agg_s, step_bytes, agg_bytes, server_s = _by_hand(sim)
    if strategy == "averaging":
      want = max(np.max(3 * step_s + agg_s), np.sum(3 * server_s))
    else:
      want = np.sum(np.maximum(3 * step_s, 3 * server_s)) + np.max(agg_s)
    assert cohort.sim_seconds == pytest.approx(want, rel=1e-12), strategy
    assert cohort.bytes_sent == int(round(np.sum(3 * step_bytes + agg_bytes)))
  # a server slower than every client sets Averaging's pace
  sim, cohort = _cohort(dataclasses.replace(CFG, server_flops_per_s=1.0))
  *_, server_s = _by_hand(sim)
  assert cohort.sim_seconds == pytest.approx(np.sum(3 * server_s), rel=1e-12)


def test_a_deadline_is_refused_for_sequential():
  with pytest.raises(ConfigError, match=r"^participation: deadline is for strategy=averaging; "
                                        r"Sequential's clients take turns"):
    dataclasses.replace(CFG, strategy="sequential", mode="loop", participation="deadline",
                        deadline_s=2.0)


def test_over_commitment_leftovers_are_unused_not_dropped():
  """Everyone is done in time (deadline 1000 s); 8 of 10 sampled for a cohort
  of 6 (over-commitment 1.3): the round ends at the 6th finisher, the two
  later ones are unused, nobody missed the deadline; the record counts them
  per cut."""
  cfg = dataclasses.replace(CFG, num_clients=10, cuts=Config.cuts, clients_per_round=6,
                            cut_tiers=((3, 0.4), (5, 0.3), (7, 0.3)),
                            client_flops_per_s=(1e6, 1e7, 1e8), speed_spread=0.3,
                            participation="deadline", deadline_s=1000.0)
  _, sim = train.build(cfg)
  step_s, agg_s, step_bytes, agg_bytes, _ = _by_hand(sim)
  done = 3 * step_s + agg_s
  for rnd in range(3):
    cohort = sim.cohort(rnd, jax.random.PRNGKey(0))
    assert cohort.size == 6 and not len(cohort.dropped) and len(cohort.unused) == 2
    assert done[cohort.ids].max() <= done[cohort.unused].min()
    assert cohort.sim_seconds == pytest.approx(done[cohort.ids].max(), rel=1e-12)
    late = np.minimum(3, np.floor(cohort.sim_seconds / step_s[cohort.unused] + 1e-9))
    want = np.sum(3 * step_bytes[cohort.ids] + agg_bytes[cohort.ids]) + np.sum(
        late * step_bytes[cohort.unused])
    assert cohort.bytes_sent == int(round(want))
    record = train._record(rnd, np.zeros((6, 4), np.float32), cohort, 1.0, 1, sim.fleet)
    unused = {str(c): int(np.sum(sim.fleet.cuts[cohort.unused] == c)) for c in (3, 5, 7)}
    assert record["unused_per_cut"] == unused and sum(unused.values()) == 2
    assert record["dropped_per_cut"] == {"3": 0, "5": 0, "7": 0}


def test_nobody_online_and_nobody_in_time_are_told_apart():
  line = lambda rec: writers.format_metrics(rec)
  assert line({"train": {}, "dropped_per_cut": {"3": 2}}) == "no client made the deadline"
  assert line({"train": {}, "dropped_per_cut": {"3": 0}}) == "nobody online"
  sim, cohort = _cohort(dataclasses.replace(CFG, availability=0.01, participation="deadline",
                                            deadline_s=5.0))
  assert cohort.online == 0 and cohort.size == 0 and not len(cohort.dropped)
  assert cohort.sim_seconds == 0.0 and cohort.bytes_sent == 0


# -- one rule for companion fields ------------------------------------------------------------
# Every row of config.EFFECTS, set away from its default in a config where it
# has no effect: (field overrides, the start of the one-line error).
NO_EFFECT = [
    (dict(deadline_s=3.0), "deadline_s: 3.0 has no effect in this config: it needs participation="),
    (dict(participation="partial", deadline_s=1.0, overcommit=2.0), "overcommit: 2.0 has no effect"),
    (dict(deadline_by_tier=True), "deadline_by_tier: True has no effect"),
    (dict(link_topk=0.2), "link_topk: 0.2 has no effect in this config: it needs link=topk"),
    (dict(client_link_bytes_per_s=(1e5,) * 6, link_bytes_per_s=1e6), "link_bytes_per_s: 1000000.0"),
    (dict(num_clients=6, cut_tiers=((3, 0.5), (7, 0.5)), cuts=(3, 3, 7, 7, 7, 7),
          client_flops_per_s=()), "cuts: [3, 3, 7, 7, 7, 7] has no effect"),
    (dict(dirichlet_alpha=0.3), "dirichlet_alpha: 0.3 has no effect in this config: it needs "
     "partition=dirichlet"),
    (dict(dataset="cifar10", synthetic_shape=(8, 8, 2, 8, 8)), "synthetic_shape:"),
    (dict(label_mode="coarse"), "label_mode: 'coarse' has no effect"),
    (dict(augment_pad=0.2), "augment_pad: 0.2 has no effect in this config: it needs augment=True"),
    (dict(optimizer="adam", momentum=0.5), "momentum: 0.5 has no effect"),
    (dict(optimizer="adam", nesterov=True), "nesterov: True has no effect"),
    (dict(step_milestones=(0.3,)), "step_milestones: [0.3] has no effect"),
    (dict(step_gamma=0.5), "step_gamma: 0.5 has no effect"),
    (dict(strategy="sequential", mode="loop", aggregate_every=2), "aggregate_every: 2 has no effect"),
    (dict(client_aggregation="cross_layer"), "client_aggregation: 'cross_layer' has no effect"),
    (dict(strategy="sequential", mode="loop", tier_local_top=True), "tier_local_top: True has no "
     "effect in this config: it needs strategy=averaging"),
    (dict(cuts=(5, 5), client_flops_per_s=(), tier_local_top=True), "tier_local_top: True has no "
     "effect in this config: it needs a fleet of several cuts"),
    (dict(strategy="sequential", mode="loop", aggregate_sides="apart"), "aggregate_sides: 'apart'"),
    (dict(cuts=(5, 5), client_flops_per_s=(), aggregate_sides="apart"), "aggregate_sides: 'apart' "
     "has no effect in this config: it needs a fleet of several cuts"),
    (dict(strategy="sequential", mode="loop", client_exits="every"), "client_exits: 'every'"),
    (dict(num_clients=4, cut_tiers=((5, 1.0),), cuts=Config.cuts, client_flops_per_s=(),
          client_exits="every"),
     "client_exits: 'every' has no effect in this config: it needs a fleet of several cuts"),
    (dict(exit_weights="rising"), "exit_weights: 'rising' has no effect in this config: it needs "
     "client_exits=every"),
    (dict(distill="deepest"), "distill: 'deepest' has no effect in this config: it needs "
     "client_exits=every"),
    (dict(distill="server", distill_start=3), "distill: 'server' has no effect in this config: it "
     "needs distill_start <= rounds"),
    (dict(distill_weight=0.5), "distill_weight: 0.5 has no effect in this config: it needs distill"),
    (dict(distill_temperature=3.0), "distill_temperature: 3.0 has no effect"),
    (dict(distill_start=2), "distill_start: 2 has no effect"),
    (dict(strategy="sequential", mode="loop", prox_mu=0.1), "prox_mu: 0.1 has no effect"),
    (dict(strategy="sequential", mode="loop", static_bn=True), "static_bn: True has no effect"),
]


@pytest.mark.parametrize("kw,msg", NO_EFFECT, ids=[m.split(":")[0] + f"-{i}"
                                                  for i, (_, m) in enumerate(NO_EFFECT)])
def test_a_field_with_no_effect_is_a_one_line_error_naming_what_it_needs(kw, msg):
  with pytest.raises(ConfigError) as e:
    dataclasses.replace(CFG, **kw)
  assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_the_table_covers_every_row_of_the_rule_and_the_companions_pass_together():
  covered = {m.split(":")[0] for _, m in NO_EFFECT}
  assert covered == {name for name, _, _ in config_lib.EFFECTS}
  # each with what it needs, it is accepted
  ok = [dict(participation="deadline", deadline_s=3.0, overcommit=2.0, deadline_by_tier=True),
        dict(link="topk", link_topk=0.2), dict(partition="dirichlet", dirichlet_alpha=0.3),
        dict(optimizer="adam"), dict(schedule="step", step_gamma=0.5, step_milestones=(0.3,)),
        dict(client_exits="every", exit_weights="rising", distill="deepest", distill_weight=0.5,
             distill_temperature=3.0, distill_start=2, tier_local_top=True, aggregate_sides="apart",
             prox_mu=0.1, static_bn=True),
        dict(strategy="sequential", mode="loop", client_aggregation="cross_layer",
             aggregate_every=2)]
  for kw in ok:
    dataclasses.replace(CFG, **kw)


def test_budgets_that_give_one_cut_refuse_the_variants_when_the_fleet_is_built():
  cfg = dataclasses.replace(CFG, cuts=Config.cuts, client_flops_per_s=(), num_clients=0,
                            client_budgets=((0, 0), (0, 0)), client_exits="every")
  with pytest.raises(train.RunError, match=r"^client_exits: 'every' has no effect .* \(the "
                                           r"budgets give every client cut 8\)$"):
    train.build(cfg)


def test_a_saved_config_from_before_the_rule_still_loads(tmp_path):
  saved = dict(CFG.to_dict(), deadline_s=3.0)   # a field that did nothing in that run
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  assert config_lib.read_json_config(path).deadline_s == 3.0
  with pytest.raises(ConfigError, match="^deadline_s: 3.0 has no effect"):
    config_lib.override(config_lib.read_json_config(path), ["rounds=3"])


@pytest.mark.parametrize("kw,msg", [
    (dict(participation="deadline", deadline_s=1.0, overcommit=1e308), "overcommit: clients "
     "sampled per cohort place, in [1, 100]"),
    (dict(speed_spread=1000.0), "speed_spread: a lognormal sigma in [0, 3]"),
    (dict(client_flops_per_s=(1e-300,) * 6), "client_flops_per_s: each entry is a number in [1, "),
    (dict(client_link_bytes_per_s=(1e300,) * 6), "client_link_bytes_per_s: each entry is a number"),
    (dict(server_flops_per_s=1e300), "server_flops_per_s: must be in [1, 1e+18]"),
    (dict(participation="deadline", deadline_s=1e300), "deadline_s: simulated seconds in [0, 1e+12]"),
])
def test_bounds_keep_every_figure_finite(kw, msg):
  with pytest.raises(ConfigError) as e:
    dataclasses.replace(CFG, **kw)
  assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_the_extremes_the_bounds_allow_give_finite_figures():
  cfg = dataclasses.replace(CFG, speed_spread=3.0, client_flops_per_s=(1.0,) * 6,
                            participation="deadline", deadline_s=1e12, overcommit=100.0)
  sim, cohort = _cohort(cfg)
  assert np.isfinite(cohort.sim_seconds) and cohort.sim_seconds > 0
  assert np.isfinite(sim.clock.step_s).all()


def test_nothing_non_finite_is_written_as_json(tmp_path):
  with pytest.raises(rundir.RunError, match=r"^refusing to write a non-finite number as JSON "
                                            r"\(at \.test\.cuts\[1\]\.x\)$"):
    rundir.finite_json({"test": {"cuts": [{"x": 1.0}, {"x": float("inf")}]}})
  f = writers.MetricsFile(tmp_path / "m.jsonl", [], True)
  with pytest.raises(rundir.RunError, match="non-finite"):
    f.write_round({"round": 0, "sim_seconds": float("nan"), "train": {}})
  f.close()
  assert (tmp_path / "m.jsonl").read_text() == ""


# -- a full disk at every write ---------------------------------------------------------------
DISK_CFG = """from hsee_jax.config import Config
def get_config():
  return Config(dataset="synthetic", synthetic_shape=(16, 16, 10, 64, 32), width=0.0625,
                cuts=(3, 5), batch_size=8, local_steps=1, rounds=2, augment=False, mode="loop",
                eval_every=2, checkpoint_every=1, eval_batch_size=32, tensorboard=True)
"""


@pytest.mark.parametrize("point,newest", [
    ("metrics:2", 1),       # round 2's record fails while its save is under way: 1 is what resumes
    pytest.param("tensorboard:2", 2, marks=pytest.mark.long),  # after round 2's record: its
    ("checkpoint:2", 1),    # round 2's save fails                   # checkpoint resumes
    pytest.param("summary", 2, marks=pytest.mark.long),  # every round done, no summary written
])
def test_a_full_disk_at_any_write_is_one_line_exit_1_naming_the_checkpoint_that_restores(
    tmp_path, capsys, monkeypatch, point, newest):
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(DISK_CFG)
  if point.startswith("checkpoint"):
    monkeypatch.setenv("HSEE_FAULT_FAIL_SAVE", point.split(":")[1])
  else:
    monkeypatch.setenv(rundir.FAULT_ENOSPC, point)
  run = tmp_path / "run"
  code = cli.main(["train", "--config", str(cfg_file), "--out", str(run)])
  err = capsys.readouterr().err
  assert code == 1, err
  assert err.count("\n") == 1 and err.startswith("hsee: ") and "No space left on device" in err, err
  assert err.rstrip().split("the newest checkpoint that restores: ")[1].startswith(
      f"after round {newest}"), err
  with Checkpointer(run / "checkpoints", create=False) as ck:
    assert ck.restores(newest) and ck.newest_restorable(newest) == newest   # checked
  monkeypatch.delenv("HSEE_FAULT_FAIL_SAVE", raising=False)
  monkeypatch.delenv(rundir.FAULT_ENOSPC, raising=False)
  assert cli.main(["train", "--resume", str(run)]) == 0                    # and it resumes
  assert f"from checkpoint after round {newest}" in capsys.readouterr().out
  assert (run / "summary.json").is_file()


# -- what is printed --------------------------------------------------------------------------
def _header(cfg) -> list[str]:
  data, sim = train.build(cfg)
  lines = []
  train._log_header(sim, data, sim.abstract_state(), lines.append)
  return lines


def test_the_header_names_what_changes_the_method():
  lines = _header(dataclasses.replace(CFG, participation="deadline", deadline_s=50.0,
                                      link="int8", client_exits="every", precision="float32"))
  assert lines[1] == ("[hsee] method: averaging; variants client_exits=every; fleet "
                      "participation=deadline, deadline_s=50; link link=int8")
  assert "precision float32 (float32)" in lines[0]
  lines = _header(dataclasses.replace(CFG, cuts=(3,), client_flops_per_s=()))
  assert ": averaging, 1 client (1 at cut 3), 1 per round" in lines[0]
  assert lines[1].startswith("[hsee] method: averaging as the paper trains it")


def test_a_dangling_symlink_as_out_is_named(tmp_path, capsys):
  link = tmp_path / "out"
  link.symlink_to(tmp_path / "gone")
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(DISK_CFG)
  assert cli.main(["train", "--config", str(cfg_file), "--out", str(link)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "it is a dangling symbolic link (to " in err, err


def test_a_mistyped_key_gets_did_you_mean():
  with pytest.raises(ConfigError, match=r"^unknown config key 'deadlin_s' in --set 'deadlin_s=3'; "
                                        r"did you mean deadline_s\?$"):
    config_lib.override(CFG, ["deadlin_s=3"])
  with pytest.raises(ConfigError, match=r"^unknown config key\(s\): overcomit; did you mean "
                                        r"overcommit\?$"):
    config_lib.from_dict(dict(CFG.to_dict(), overcomit=1.3))
  with pytest.raises(ConfigError, match=r"^unknown config key 'zzz' in --set 'zzz=1'$"):
    config_lib.override(CFG, ["zzz=1"])


def test_a_sweep_point_sets_back_the_base_fields_it_leaves_without_effect():
  from hsee_jax import sweep
  base = dataclasses.replace(CFG, participation="deadline", deadline_s=5.0, overcommit=1.5)
  lines = []
  runs = sweep.plan(base, {"participation": ["all", "deadline"]}, [0], lines.append)
  cfgs = {r.point["participation"]: r.cfg for r in runs}
  assert cfgs["all"].deadline_s == 0.0 and cfgs["all"].overcommit == 1.3
  assert cfgs["deadline"].deadline_s == 5.0 and cfgs["deadline"].overcommit == 1.5
  assert lines == ["[sweep] participation=all: deadline_s, overcommit back to the default "
                   "(no effect at this point)"]
  with pytest.raises(ConfigError, match=r"^grid point link_topk=0.2: link_topk: 0.2 has no effect"):
    sweep.plan(CFG, {"link_topk": [0.2]}, [0])


def test_soft_labels_are_priced_from_the_round_distillation_starts():
  cfg = dataclasses.replace(CFG, distill="server", distill_start=2, rounds=3)
  _, sim = train.build(cfg)
  key = jax.random.PRNGKey(0)
  sent = [sim.cohort(r, key).bytes_sent for r in range(3)]
  soft = 6 * 3 * cfg.batch_size * 4 * 10      # 6 clients x 3 steps x 8 images x 10 float32 logits
  assert sent[1] - sent[0] == soft and sent[2] == sent[1]


def test_one_client_is_said_as_one():
  from hsee_jax import evaluation
  acc = {"mean": 0.5, "min": 0.5, "max": 0.5}
  line = evaluation.format_cut({"cut": 3, "clients": 1, "evaluated": "shared", "exit_acc": acc,
                                "full_acc": acc})
  assert line.startswith("cut 3 (1 client, shared model): ")
  assert "(2 clients" in evaluation.format_cut({"cut": 3, "clients": 2, "evaluated": 2,
                                                "exit_acc": acc, "full_acc": acc})
