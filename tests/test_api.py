"""The public API: what ``hsee_jax`` exports is documented, and the example
outside the package trains a network of its own through it."""
import importlib.util
import inspect
from pathlib import Path

import numpy as np

import hsee_jax

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_network.py"


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
