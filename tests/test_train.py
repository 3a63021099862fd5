import dataclasses
import json
import signal

import numpy as np
import pytest

from hsee_jax import cli
from hsee_jax import train as train_lib
from hsee_jax.config import Config

SYNTH = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 96, 40), width=0.125,
               cuts=(2, 6), batch_size=8, local_steps=2, rounds=2, eval_batch_size=16,
               exit_thresholds=(0.0, 0.5, 1.0))


@pytest.mark.long
@pytest.mark.parametrize("strategy", ["averaging", "sequential"])
def test_training_lowers_loss_on_real_cifar10(cifar10_small, tmp_path, strategy):
  cfg = Config(dataset="cifar10", width=0.125, cuts=(2, 5, 7), strategy=strategy, rounds=5,
               batch_size=32, lr=0.05, augment=False, schedule="constant", eval_every=5,
               exit_thresholds=(0.0, 0.5, 1.0))
  summary = train_lib.train(cfg, tmp_path, dataset=cifar10_small, log=lambda s: None)
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in recs] == list(range(5))
  first, last = recs[0]["train"], recs[-1]["train"]
  assert last["exit_loss"] < first["exit_loss"] - 0.1
  assert last["full_loss"] < first["full_loss"] - 0.1
  assert summary["test"]["mean_full_acc"] > 0.15  # chance is 0.10
  assert [c["cut"] for c in summary["test"]["cuts"]] == [2, 5, 7]
  # Averaging evaluates one shared model per cut; Sequential each client
  assert len(summary["test"]["clients"]) == (3 if strategy == "sequential" else 0)


def test_cli_writes_metrics_and_summary(tmp_path, capsys):
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text("from hsee_jax.config import Config\n"
                      f"def get_config():\n  return Config(**{SYNTH.to_dict()!r})\n"
                      .replace("[", "(").replace("]", ")"))
  out = tmp_path / "run"
  assert cli.main(["train", "--config", str(cfg_file), "--out", str(out),
                   "--set", "strategy=sequential", "--set", "rounds=3"]) == 0
  printed = capsys.readouterr().out
  assert "round   3/3" in printed and "img/s" in printed
  lines = (out / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  rec = json.loads(lines[-1])
  assert set(rec["train"]) == {"exit_loss", "full_loss", "exit_acc", "full_acc"}
  summary = json.loads((out / "summary.json").read_text())
  assert summary["config"]["strategy"] == "sequential" and summary["rounds"] == 3
  clients = summary["test"]["clients"]
  assert [c["cut"] for c in clients] == [2, 6]
  for c in clients:
    assert 0.0 <= c["exit_acc"] <= 1.0 and 0.0 <= c["full_acc"] <= 1.0
    table = {r["threshold"]: r for r in c["early_exit"]}
    assert table[0.0]["client_fraction"] == 0.0 and table[0.0]["accuracy"] == c["full_acc"]
    assert table[1.0]["client_fraction"] == 1.0 and table[1.0]["accuracy"] == c["exit_acc"]
  # a second run into the same directory is refused with one line
  assert cli.main(["train", "--config", str(cfg_file), "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "already holds a run" in err and err.count("\n") == 1


def test_cli_bad_inputs_are_one_line_errors(tmp_path, capsys):
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text("from hsee_jax.config import Config\ndef get_config():\n  return Config()\n")
  for args, pattern in [(["--set", "cuts=(3,9)"], "cut layer 9 out of range"),
                        (["--set", "dataset=mnist"], "unknown value 'mnist'"),
                        (["--set", "data_dir=/nonexistent/c10"], "data folder /nonexistent/c10 not found"),
                        (["--set", "nope=1"], "unknown config key 'nope'")]:
    assert cli.main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "o")] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hsee: error:") and pattern in err and "\n" not in err


def test_more_clients_than_samples(tmp_path):
  cfg = dataclasses.replace(SYNTH, synthetic_shape=(16, 16, 4, 3, 4), cuts=(1, 2, 3, 4))
  with pytest.raises(Exception, match="more clients \\(4\\) than training samples \\(3\\)"):
    train_lib.train(cfg, tmp_path, log=lambda s: None)


def test_non_finite_loss_stops_with_round_and_client(tmp_path):
  cfg = dataclasses.replace(SYNTH, lr=1e30, optimizer="sgd", momentum=0.0, rounds=3)
  with pytest.raises(train_lib.RunError, match=r"round \d: non-finite \w+_loss \(.*\) on client \d \(cut \d\)"):
    train_lib.train(cfg, tmp_path, log=lambda s: None)
  last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["event"] == "stopped" and "non-finite" in last["error"]


def test_same_seed_same_metrics(tmp_path):
  a = train_lib.train(SYNTH, tmp_path / "a", log=lambda s: None)
  b = train_lib.train(SYNTH, tmp_path / "b", log=lambda s: None)
  strip = lambda p: [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "images_per_s")}
                     for l in (p / "metrics.jsonl").read_text().splitlines()]
  assert strip(tmp_path / "a") == strip(tmp_path / "b")
  assert a["test"] == b["test"]
  train_lib.train(dataclasses.replace(SYNTH, seed=1), tmp_path / "c", log=lambda s: None)
  assert strip(tmp_path / "c") != strip(tmp_path / "a")


@pytest.mark.long
@pytest.mark.parametrize("model,strategy", [("vgg16_bn", "sequential"),
                                            ("mobilenet_v2", "averaging")])
def test_every_network_trains_with_budgets_checkpoints_and_evaluation(tmp_path, model, strategy):
  """The other shipped networks through the whole machinery, with no code of
  their own: device budgets turned into cuts by the cost table, training (one
  strategy each, to keep the suite short), the simulated clock, a checkpoint
  read back by eval."""
  from hsee_jax import costs, models
  net = models.network(model, 4, 0.125)
  table = costs.cost_table(net, (16, 16, 3))
  assert [r["cut"] for r in table] == list(net.allowed_cuts())
  # a budget that just fits cut 2's training step, and no budget: the deepest cut
  fits_2 = (table[1]["client_train_flops"] * 8 * 1.01, 0)
  cfg = dataclasses.replace(SYNTH, cuts=Config.cuts, model=model, num_clients=2, mode="loop", local_steps=1,
                            rounds=1, budget_tiers=((fits_2, 0.5), ((0, 0), 0.5)))
  run = tmp_path / "run"
  summary = train_lib.train(dataclasses.replace(cfg, strategy=strategy), run, log=lambda s: None)
  cuts = sorted(json.loads((run / "fleet.json").read_text())["cuts"])
  assert cuts == [2, net.num_units - 1]
  assert [c["cut"] for c in summary["test"]["cuts"]] == cuts
  assert np.isfinite(summary["test"]["mean_full_acc"])
  assert train_lib.evaluate_run(run, log=lambda s: None)["test"]["cuts"] == summary["test"]["cuts"]
  seconds = costs.simulated_round_seconds(strategy, cuts, {r["cut"]: r for r in table}, 1, 8,
                                          [1e10, 1e10], 1e13, 1.25e6)
  assert np.isfinite(seconds) and seconds > 0


def _event_scalars(logdir):
  """(tag, step) -> value and the text tags of the event files in ``logdir``
  (TFRecord framing read here; the Event protos through tensorboardX's own)."""
  import struct

  from tensorboardX.proto import event_pb2
  scalars, texts = {}, set()
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "text":
          texts.add(v.tag)
        else:
          scalars[(v.tag, event.step)] = v.simple_value
  return scalars, texts


def test_tensorboard_writer_gets_every_round(tmp_path, monkeypatch):
  """tensorboard=True: per round the train metrics (fleet and per cut), at the
  evaluated rounds each cut's test accuracies, and the config as text; the
  values are metrics.jsonl's."""
  cfg = dataclasses.replace(SYNTH, tensorboard=True, rounds=3, eval_every=2)
  train_lib.train(cfg, tmp_path, log=lambda s: None)
  scalars, texts = _event_scalars(tmp_path / "tensorboard")
  assert any(t.startswith("config") for t in texts)
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  for r in recs:
    step = r["round"] + 1
    for k, v in r["train"].items():
      assert scalars[(f"train/{k}", step)] == pytest.approx(v, rel=1e-6)
    for c in r["train_per_client"]:   # one client per cut here
      assert scalars[(f"train/cut{c['cut']}/exit_acc", step)] == pytest.approx(c["exit_acc"])
    evaluated = "test" in r
    assert evaluated == (step in (2, 3))
    for c in r.get("test", {}).get("cuts", []):
      assert scalars[(f"test/cut{c['cut']}/full_acc", step)] == pytest.approx(c["full_acc"]["mean"])
    assert (("test/mean_exit_acc", step) in scalars) == evaluated
  # a config without it writes none; a missing library is a one-line config error
  train_lib.train(SYNTH, tmp_path / "plain", log=lambda s: None)
  assert not (tmp_path / "plain" / "tensorboard").exists()
  import importlib.util

  from hsee_jax.config import ConfigError
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(ConfigError, match=r"^tensorboard: True needs tensorboardX: pip install"):
    dataclasses.replace(SYNTH, tensorboard=True)


def test_run_rounds_fixes_the_order_of_a_round_and_stops_when_asked():
  """Each round: train, then the save starts, evaluation, the writers, the save
  finishes; evaluation every eval_every rounds and after the last; a stop
  asked before a round ends the loop there."""
  import jax
  cfg = dataclasses.replace(SYNTH, rounds=3, eval_every=2)
  _, sim = train_lib.build(cfg)
  events = []

  class Writer:
    def write_round(self, record):
      events.append(("write", record["round"], "test" in record))

  class Checkpoints:   # what run_rounds asks of train.RoundCheckpoints
    def due(self, rounds_done):
      return rounds_done == 2

    def last(self):
      return "none"

    def save(self, rounds_done, state):
      events.append(("save", rounds_done))

    def finish(self, rounds_done):
      events.append(("finish", rounds_done))

  def evaluate(state):
    events.append(("evaluate",))
    return {"mean_exit_acc": 0.5}

  key = jax.random.PRNGKey(1)
  state, done, signum = train_lib.run_rounds(sim, sim.init_state(jax.random.PRNGKey(0)), 0, key,
                                             evaluate=evaluate, checkpoints=Checkpoints(),
                                             writers=[Writer()])
  assert (done, signum) == (3, None)
  assert events == [("write", 0, False),
                    ("save", 2), ("evaluate",), ("write", 1, True), ("finish", 2),
                    ("evaluate",), ("write", 2, True)]
  # from round 2 on, a stop asked before the second round it would train
  events.clear()
  asked = iter([None, signal.SIGINT])
  _, done, signum = train_lib.run_rounds(sim, state, 1, key, writers=[Writer()],
                                         stop=lambda: next(asked))
  assert (done, signum) == (2, signal.SIGINT) and events == [("write", 1, False)]


def _plain(run):
  return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
          for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.long
def test_a_run_begun_from_another_runs_round_goes_on_as_it_did(tmp_path):
  """begin_from=(RUN, ROUND) (PBT's exploit): with the same config the new
  run's records are the source's bit for bit; with another learning rate
  the rounds up to ROUND are the source's and the later ones its own; a
  round before any checkpoint, or a state of another shape, is one line."""
  cfg = dataclasses.replace(SYNTH, synthetic_shape=(16, 16, 4, 64, 32), width=0.0625,
                            cuts=(2, 4), rounds=4, checkpoint_every=1, keep_checkpoints=4,
                            eval_every=4, exit_thresholds=(0.5,), mode="loop")
  quiet = lambda s: None
  train_lib.train(cfg, tmp_path / "a", log=quiet)
  train_lib.train(cfg, tmp_path / "b", begin_from=(tmp_path / "a", 2), log=quiet)
  assert _plain(tmp_path / "b") == _plain(tmp_path / "a")
  lines = []
  summary = train_lib.train(dataclasses.replace(cfg, lr=cfg.lr / 4), tmp_path / "c",
                            begin_from=(tmp_path / "a", 3), log=lines.append)
  assert summary["resumed_from_round"] == 3
  assert any(f"begun from {tmp_path / 'a'} after round 3; differs in lr" in s for s in lines)
  a, c = _plain(tmp_path / "a"), _plain(tmp_path / "c")
  assert c[:3] == a[:3] and c[3]["train"] != a[3]["train"]
  assert json.loads((tmp_path / "c" / "config.json").read_text())["lr"] == cfg.lr / 4
  with pytest.raises(train_lib.RunError, match="no complete checkpoint at or before that round"):
    train_lib.train(cfg, tmp_path / "d", begin_from=(tmp_path / "a", 0), log=quiet)
  with pytest.raises(train_lib.RunError) as e:
    train_lib.train(dataclasses.replace(cfg, cuts=(2, 3)), tmp_path / "e",
                    begin_from=(tmp_path / "a", 2), log=quiet)
  assert "\n" not in str(e.value)
