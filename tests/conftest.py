import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole test run, its subprocesses
# included (they inherit the environment): many tests compile the same programs
# in new processes or from new closures. Set before JAX is imported; removed at
# the end. Tracing still happens as before (the tests that count traces are
# unaffected), and a cached program is the same program.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="hsee-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# The tests compile far more than they compute (tiny data, many programs):
# LLVM at -O0 compiles XLA:CPU programs about 40% faster here, for slower
# kernels. Same XLA programs and semantics; the tests compare runs made under
# the same flags (subprocesses inherit them). Benchmarks run without it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                   "--xla_backend_optimization_level=0"]))


def cifar10_dir() -> Path:
  root = os.environ.get("HSEE_DATA_DIR")
  return (Path(root) if root else REPO.parent / "shared" / "data") / "cifar10"


@pytest.fixture(scope="session")
def cifar10_small():
  """A small, seeded subset of the shipped CIFAR-10 (decoded once, cached)."""
  from hsee_jax.config import Config
  from hsee_jax.data import load_dataset
  return load_dataset(Config(dataset="cifar10", train_subset=600, test_subset=300))


def write_image_zip(path: Path, classes, per_class: int, size=(8, 8), seed=0, fmt="PNG"):
  """A <class>/<file> image archive like ../shared/data/cifar10, made by the test."""
  import io
  import zipfile

  from PIL import Image
  rng = np.random.default_rng(seed)
  with zipfile.ZipFile(path, "w") as zf:
    for c_i, c in enumerate(classes):
      for j in range(per_class):
        arr = (rng.integers(0, 64, size + (3,)) + 48 * c_i).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        zf.writestr(f"{c}/{j:04d}.png", buf.getvalue())
  return path


@pytest.fixture
def image_folder(tmp_path):
  folder = tmp_path / "imgs"
  folder.mkdir()
  write_image_zip(folder / "train.zip", ["cat", "ant", "bee"], 12, seed=1)
  write_image_zip(folder / "test.zip", ["cat", "ant", "bee"], 4, seed=2)
  return folder


# The longest test files first: pytest-xdist (--dist loadfile) hands files to
# the workers in collection order, so the short ones fill in at the end
# instead of one worker finishing a long file alone.
LONGEST_FIRST = ("test_distributed.py", "test_golden.py", "test_strategies.py",
                 "test_reliability.py", "test_engine.py", "test_clock.py", "test_dispatch.py",
                 "test_iot.py", "test_variants.py", "test_train.py", "test_fleet.py",
                 "test_sweep.py", "test_precision.py", "test_checkpoint.py", "test_reproduce.py",
                 "test_experiments.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
