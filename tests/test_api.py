"""The public API: what ``hsee_jax`` exports is documented, and the example
outside the package trains a network of its own through it."""
import importlib.util
import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hsee_jax

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_network.py"
OBJECTIVE_EXAMPLE = EXAMPLE.with_name("exit_objective.py")


def test_every_export_is_documented():
  """Every exported class and function, and every public method of an
  exported class, has a docstring of its own (not the one dataclasses make)."""
  for name in hsee_jax.__all__:
    obj = getattr(hsee_jax, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
      doc = inspect.getdoc(obj) or ""
      assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring of its own"
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
      for attr, member in inspect.getmembers(obj):
        if (attr.startswith("_") and attr != "__call__") or not callable(member) \
            or inspect.isclass(member) or getattr(member, "__module__", "").split(".")[0] != "hsee_jax":
          continue
        assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_custom_network_example_trains_through_the_public_api(capsys):
  assert len(EXAMPLE.read_text().splitlines()) < 60
  spec = importlib.util.spec_from_file_location("custom_network", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  acc = example.main(rounds=2, steps=3)
  out = capsys.readouterr().out
  # both clients trained in both rounds, with every metric printed, then were evaluated
  assert out.count("round ") == 4 and all(k in out for k in hsee_jax.METRIC_NAMES), out
  assert "cut 1: test exit_acc" in out and "cut 2: test exit_acc" in out, out
  assert all(0.0 <= a <= 1.0 for a in acc) and np.isfinite(acc).all()
  # the network is the example's own, split where it said
  net = example.SmallNet(num_classes=10)
  assert isinstance(net, hsee_jax.SplitNetwork) and net.allowed_cuts() == (1, 2)
  assert net.unit_output_shape(2, (32, 32, 3)) == (8, 8, 32)


def test_exit_objective_example_trains_with_its_own_objective(capsys, monkeypatch):
  """examples/exit_objective.py: a user's client objective (distillation from
  the server, gated by its correctness) passed to build, 2 rounds; the
  objective is what the runners train with (its gate changes the updates)."""
  assert len(OBJECTIVE_EXAMPLE.read_text().splitlines()) <= 60
  spec = importlib.util.spec_from_file_location("exit_objective", OBJECTIVE_EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  calls = []
  make = example.gated_server_distillation
  monkeypatch.setattr(example, "gated_server_distillation",
                      lambda: (calls.append(1), make())[1])
  test = example.main(rounds=2, train_subset=256, test_subset=100, local_steps=2, seed=5)
  out = capsys.readouterr().out
  assert calls and out.count("round ") == 2 and "cut 2: test exit_acc" in out, out
  assert all(0.0 <= c["exit_acc"]["mean"] <= 1.0 for c in test["cuts"])
  # the gate: a server right on no image adds nothing; a right one adds the KL
  objective = make(weight=1.0, temperature=1.0)
  rng = np.random.default_rng(0)
  exits = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)]
  labels = jnp.asarray([0, 1, 2, 0])
  hp = dict(zip(hsee_jax.HPARAMS, jnp.float32([0.1, 0.9, 0.0, 1.0, 0.0])))
  wrong = jax.nn.one_hot((labels + 1) % 3, 3) * 5
  plain = float(hsee_jax.cross_entropy(exits[0], labels))
  assert float(objective(exits, wrong, labels, hp)) == pytest.approx(plain, rel=1e-6)
  assert float(objective(exits, jax.nn.one_hot(labels, 3) * 5, labels, hp)) > plain + 1e-3
