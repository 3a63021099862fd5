import numpy as np

from hsee_jax.evaluation import early_exit_table, normalized_entropy


def test_normalized_entropy_bounds():
  logits = np.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]])
  ent = normalized_entropy(logits)
  np.testing.assert_allclose(ent[:2], [1.0, 0.0], atol=1e-6)
  assert 0.0 < ent[2] < 1.0


def test_early_exit_table():
  labels = np.array([0, 1, 2, 3])
  # samples 0, 1 confident at the exit (sample 1 wrongly); 2, 3 uncertain (sample 2 right)
  exit_logits = np.array([[20.0, 0, 0, 0], [20.0, 0, 0, 0], [0.1, 0, 0.2, 0], [0.3, 0, 0, 0]])
  server_logits = np.eye(4)[[0, 1, 0, 0]] * 5  # server right on 0 and 1, wrong on 2 and 3
  rows = {r["threshold"]: r for r in early_exit_table(exit_logits, server_logits, labels,
                                                      [0.0, 0.5, 1.0])}
  assert rows[0.0] == {"threshold": 0.0, "accuracy": 0.5, "client_fraction": 0.0}   # always server
  assert rows[1.0] == {"threshold": 1.0, "accuracy": 0.5, "client_fraction": 1.0}   # always client
  # tau = 0.5: samples 0, 1 stop at the client (right, wrong); 2, 3 go on (wrong, wrong)
  assert rows[0.5] == {"threshold": 0.5, "accuracy": 0.25, "client_fraction": 0.5}


def test_shared_model_full_path_evaluated_once_and_equal_per_cut(monkeypatch):
  """After an Averaging aggregation the clients of every cut hold one whole
  network: its full path runs once, and equals it run from each cut."""
  import jax
  from hsee_jax import evaluation
  from hsee_jax import train as train_lib
  from hsee_jax.config import Config
  cfg = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 64, 48), width=0.125,
               cuts=(2, 5, 7), batch_size=8, local_steps=2, rounds=1, mode="loop")
  dataset, sim = train_lib.build(cfg)
  state, _, _ = sim.run_round(sim.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  calls = []
  real = evaluation.client_logits
  monkeypatch.setattr(evaluation, "client_logits",
                      lambda *a, **k: calls.append(k.get("full_path", True)) or real(*a, **k))
  test = evaluation.evaluate(sim, state, dataset, [0.5], 16)
  assert calls == [True, False, False]
  for m, c in zip(sim.algorithm.eval_models(state), test["cuts"]):
    e, s = real(sim.net, m.cut, m.client, m.server, dataset.test_images, dataset.mean,
                dataset.std, 16)
    assert c["server_acc"]["mean"] == float(np.mean(np.argmax(s, -1) == dataset.test_labels))
    assert c["exit_acc"]["mean"] == float(np.mean(np.argmax(e, -1) == dataset.test_labels))
    assert c["early_exit"] == early_exit_table(e, s, dataset.test_labels, [0.5])
