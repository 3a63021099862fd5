"""Every shipped config, shrunk to a few images and two rounds, gives the
metrics recorded in tests/golden/metrics.json: bit for bit under the JAX
version that recorded them, to float32 rounding under another.

The shrinking changes only the data, the rounds and the fleet's size (and
width 1.0 to 0.125), so each config's programs (strategy, cuts, batch size,
schedule, client state, partition) run as shipped. A change to the core that
keeps the metrics keeps this file; one that changes them on purpose records
it again:

    HSEE_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py -n 0
"""
import json
import os
from pathlib import Path

import jax
import jaxlib
import numpy as np
import pytest

from hsee_jax import config as config_lib
from hsee_jax import train

pytestmark = pytest.mark.long  # run by .ci/run after the default run

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden") / "metrics.json"
SHRINK = ["train_subset=192", "test_subset=96", "rounds=2", "eval_every=1", "eval_batch_size=96",
          "checkpoint_every=0"]
PER_CONFIG = {"averaging": ["width=0.125"], "sequential": ["width=0.125"],
              "fleet": ["num_clients=12", "clients_per_round=4", "local_steps=2"]}
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
TIMING = ("seconds", "images_per_s")


def _metrics(name: str, out: Path) -> dict:
  cfg = config_lib.load(REPO / "configs" / f"{name}.py", SHRINK + PER_CONFIG.get(name, []))
  summary = train.train(cfg, out, log=lambda s: None)
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return {"records": [{k: v for k, v in r.items() if k not in TIMING} for r in records],
          "test": summary["test"]}


def _versions() -> dict:
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


@pytest.fixture(scope="module")
def golden():
  if os.environ.get("HSEE_RECORD_GOLDEN"):
    return None
  return json.loads(GOLDEN.read_text())


def _close(a, b, path="") -> list[str]:
  """Where ``a`` and ``b`` differ beyond float32 rounding (a few ulps)."""
  if isinstance(a, dict) and isinstance(b, dict):
    if a.keys() != b.keys():
      return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
    return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return [f"{path}: {len(a)} vs {len(b)} entries"]
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
  if isinstance(a, float) and isinstance(b, (int, float)):
    return [] if np.isclose(a, b, rtol=1e-5, atol=1e-6) else [f"{path}: {a} vs {b}"]
  return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_the_recorded_metrics_of_every_shipped_config(golden, tmp_path):
  got = {name: _metrics(name, tmp_path / name) for name in CONFIGS}
  if golden is None:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"versions": _versions(), "configs": got}, indent=1) + "\n")
    pytest.skip(f"recorded {GOLDEN}")
  assert sorted(golden["configs"]) == CONFIGS, "a shipped config was added or removed: record again"
  for name in CONFIGS:
    if golden["versions"] == _versions():
      assert got[name] == golden["configs"][name], name   # bit for bit
    else:
      assert not _close(got[name], golden["configs"][name]), (name, _close(got[name],
                                                                           golden["configs"][name]))
