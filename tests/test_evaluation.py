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
