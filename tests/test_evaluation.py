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


def test_shared_model_evaluated_in_one_pass_equal_to_each_cut_alone(monkeypatch):
  """After an Averaging aggregation the clients of every cut hold one whole
  network: one forward pass gives every cut's exit and the full path, and
  they equal each cut's client part and server part run on their own."""
  import jax
  from hsee_jax import evaluation
  from hsee_jax import train as train_lib
  from hsee_jax.config import Config
  cfg = Config(dataset="synthetic", synthetic_shape=(16, 16, 4, 64, 48), width=0.125,
               cuts=(2, 5, 7), batch_size=8, local_steps=2, rounds=1, mode="loop")
  dataset, sim = train_lib.build(cfg)
  state, _, _ = sim.run_round(sim.init_state(jax.random.PRNGKey(0)), 0, jax.random.PRNGKey(1))
  calls = []
  real = evaluation.path_logits
  monkeypatch.setattr(evaluation, "path_logits",
                      lambda net, cuts, *a: calls.append(tuple(cuts)) or real(net, cuts, *a))
  test = evaluation.evaluate(sim.net, sim.fleet, sim.algorithm.eval_models(state), dataset,
                              [0.5], 16)
  assert calls == [(2, 5, 7)]   # one pass for the three cuts
  ms = sim.algorithm.eval_models(state)
  assert all(m.one_network for m in ms) and [m.cut for m in ms] == [2, 5, 7]
  data = (dataset.test_images, dataset.mean, dataset.std, 16)
  exits, whole = real(sim.net, [2, 5, 7], [m.client for m in ms], ms[-1].server, *data)
  labels = dataset.test_labels
  for m, c, e_pass in zip(ms, test["cuts"], exits):
    (e,), s = real(sim.net, [m.cut], [m.client], m.server, *data)   # this cut alone
    np.testing.assert_allclose(e_pass, e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole, s, rtol=1e-5, atol=1e-5)
    assert c["exit_acc"]["mean"] == float(np.mean(np.argmax(e_pass, -1) == labels))
    assert c["full_acc"]["mean"] == float(np.mean(np.argmax(whole, -1) == labels))
    assert c["early_exit"] == early_exit_table(e_pass, whole, labels, [0.5])
