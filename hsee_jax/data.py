"""Datasets, client partitions and on-device augmentation.

* ``cifar10`` and ``imagefolder``: a ``train.zip`` and a ``test.zip`` holding
  ``<class>/<file>`` images that Pillow reads, all of one size; labels are the
  sorted class names. Archives are checked against ``SHA256SUMS`` when the
  folder has one, decoded once and cached as uint8 arrays.
* ``cifar100``, ``stl10``: a local folder in the same layout if there is one,
  otherwise ``tensorflow_datasets`` (needs the ``[tfds]`` extra and a network
  or a prepared ``TFDS_DATA_DIR``).
* ``synthetic``: seeded random images with a per-class pattern, for
  benchmarks and tests that need no files.

Where the data lives: ``Config.data_dir`` if set, else ``$HSEE_DATA_DIR/<dataset>``,
else ``<repo>/../shared/data/<dataset>``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class DataError(RuntimeError):
  """Data that cannot be used; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train_images: np.ndarray  # uint8 [N, H, W, 3]
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple:
    return tuple(self.train_images.shape[1:])

  @functools.cached_property
  def mean(self) -> np.ndarray:
    return self.train_images.reshape(-1, 3).mean(0, dtype=np.float64).astype(np.float32) / 255.0

  @functools.cached_property
  def std(self) -> np.ndarray:
    x = self.train_images.reshape(-1, 3)
    return (x.std(0, dtype=np.float64) / 255.0).astype(np.float32) + 1e-6


# -- locating data -------------------------------------------------------------
def data_folder(cfg: Config) -> Path:
  if cfg.data_dir:
    return Path(cfg.data_dir).expanduser()
  if os.environ.get("HSEE_DATA_DIR"):
    return Path(os.environ["HSEE_DATA_DIR"]).expanduser() / cfg.dataset
  return REPO_ROOT.parent / "shared" / "data" / cfg.dataset


def cache_dir() -> Path:
  return Path(os.environ.get("HSEE_CACHE_DIR", Path.home() / ".cache" / "hsee_jax"))


def load_dataset(cfg: Config) -> Dataset:
  """Load, subset and sanity-check the dataset a config names."""
  if cfg.dataset == "synthetic":
    ds = synthetic_dataset(cfg.synthetic_shape, cfg.seed)
  else:
    folder = data_folder(cfg)
    if cfg.dataset in ("cifar10", "imagefolder") or (folder / "train.zip").exists():
      ds = load_image_folder(folder, cfg.dataset)
    else:
      ds = _load_tfds(cfg.dataset, folder)
  return _subset(ds, cfg.train_subset, cfg.test_subset, cfg.seed)


def _subset(ds: Dataset, n_train: int, n_test: int, seed: int) -> Dataset:
  def pick(images, labels, n, stream):
    if n == 0 or n >= len(labels):
      return images, labels
    idx = np.sort(np.random.default_rng([seed, stream]).choice(len(labels), n, replace=False))
    return images[idx], labels[idx]
  tr = pick(ds.train_images, ds.train_labels, n_train, 1)
  te = pick(ds.test_images, ds.test_labels, n_test, 2)
  return dataclasses.replace(ds, train_images=tr[0], train_labels=tr[1],
                             test_images=te[0], test_labels=te[1])


# -- image-folder archives -------------------------------------------------------
def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _expected_sums(folder: Path) -> dict[str, str]:
  sums = folder / "SHA256SUMS"
  if not sums.exists():
    return {}
  out = {}
  for line in sums.read_text().splitlines():
    parts = line.split()
    if len(parts) == 2:
      out[parts[1].lstrip("*")] = parts[0].lower()
  return out


def load_image_folder(folder: Path, name: str = "imagefolder") -> Dataset:
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(
        f"dataset {name}: data folder {folder} not found; set data_dir in the config to a "
        f"folder holding train.zip and test.zip (or HSEE_DATA_DIR to a folder holding "
        f"{name}/train.zip and {name}/test.zip)")
  expected = _expected_sums(folder)
  splits = {}
  for split in ("train", "test"):
    path = folder / f"{split}.zip"
    if not path.is_file():
      raise DataError(f"dataset {name}: archive {path} not found (need train.zip and test.zip)")
    digest = _sha256(path)
    want = expected.get(path.name)
    if want is not None and want != digest:
      raise DataError(f"dataset {name}: archive {path} is corrupt or altered "
                      f"(sha256 {digest[:12]}... does not match SHA256SUMS {want[:12]}...)")
    splits[split] = _cached_decode(path, digest, name)
  train_names, test_names = splits["train"][2], splits["test"][2]
  if train_names != test_names:
    only_train = sorted(set(train_names) - set(test_names))
    only_test = sorted(set(test_names) - set(train_names))
    raise DataError(f"dataset {name}: train.zip and test.zip hold different classes "
                    f"(only in train: {', '.join(only_train) or 'none'}; "
                    f"only in test: {', '.join(only_test) or 'none'})")
  if len(train_names) < 2:
    raise DataError(f"dataset {name}: {len(train_names)} class ({', '.join(train_names)}); "
                    f"classification needs at least 2 <class> folders")
  if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
    raise DataError(f"dataset {name}: train and test images differ in size "
                    f"({splits['train'][0].shape[1:]} vs {splits['test'][0].shape[1:]})")
  return Dataset(name, splits["train"][0], splits["train"][1], splits["test"][0],
                 splits["test"][1], train_names)


def _cached_decode(path: Path, digest: str, name: str):
  cache = cache_dir() / f"{path.stem}-{digest[:20]}.npz"
  if cache.exists():
    try:
      with np.load(cache, allow_pickle=False) as z:
        return z["images"], z["labels"], tuple(str(c) for c in z["classes"])
    except Exception:  # a broken cache file is rebuilt, never trusted
      pass
  images, labels, classes = decode_archive(path, name)
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=images, labels=labels, classes=np.array(classes))
    os.replace(tmp, cache)
  except OSError:
    pass  # no writable cache: decode again next time
  return images, labels, classes


def decode_archive(path: Path, name: str = "imagefolder"):
  """Decode every ``<class>/<file>`` image of a zip to uint8 [N, H, W, 3]."""
  from PIL import Image
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(f"dataset {name}: archive {path} is not a readable zip ({e})") from None
  with zf:
    members = sorted(m for m in zf.namelist()
                     if not m.endswith("/") and m.lower().endswith(IMAGE_SUFFIXES)
                     and "/" in m.strip("/") and not Path(m).name.startswith("."))
    if not members:
      raise DataError(f"dataset {name}: archive {path} holds no <class>/<image> files")
    classes = tuple(sorted({m.strip("/").split("/")[-2] for m in members}))
    index = {c: i for i, c in enumerate(classes)}
    images, labels, shape = [], [], None
    for m in members:
      try:
        with Image.open(io.BytesIO(zf.read(m))) as im:
          arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
      except Exception as e:  # noqa: BLE001  (zip CRC errors, truncated images, ...)
        raise DataError(f"dataset {name}: cannot read {m} in {path} "
                        f"({type(e).__name__}: {e})") from None
      if shape is None:
        shape = arr.shape
      elif arr.shape != shape:
        raise DataError(f"dataset {name}: {m} in {path} is {arr.shape[:2]}, others are "
                        f"{shape[:2]}; all images must have one size")
      images.append(arr)
      labels.append(index[m.strip("/").split("/")[-2]])
  return np.stack(images), np.asarray(labels, np.int32), classes


def _load_tfds(name: str, folder: Path) -> Dataset:
  hint = (f"pip install 'hsee_jax[tfds]' with a network (or a prepared TFDS_DATA_DIR), "
          f"or put train.zip and test.zip (<class>/<image> layout) in {folder}")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"dataset {name}: tensorflow-datasets is not installed; {hint}") from None
  try:
    train, test = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1,
                                          as_supervised=True))
    info = tfds.builder(name).info
  except Exception as e:  # noqa: BLE001
    msg = str(e).splitlines()[0] if str(e) else ""
    raise DataError(f"dataset {name}: tensorflow-datasets could not load it "
                    f"({type(e).__name__}: {msg}); {hint}") from None
  classes = tuple(info.features["label"].names)
  return Dataset(name, np.asarray(train[0], np.uint8), np.asarray(train[1], np.int32),
                 np.asarray(test[0], np.uint8), np.asarray(test[1], np.int32), classes)


def synthetic_dataset(shape: tuple, seed: int) -> Dataset:
  """Random images, each class a fixed pattern plus noise (learnable, no files)."""
  h, w, classes, n_train, n_test = shape
  rng = np.random.default_rng([seed, 99])
  patterns = rng.integers(0, 256, (classes, h, w, 3))

  def make(n):
    y = rng.integers(0, classes, n).astype(np.int32)
    x = 0.5 * patterns[y] + 0.5 * rng.integers(0, 256, (n, h, w, 3))
    return x.astype(np.uint8), y
  xtr, ytr = make(n_train)
  xte, yte = make(n_test)
  return Dataset("synthetic", xtr, ytr, xte, yte, tuple(f"class_{i}" for i in range(classes)))


# -- client partitions -------------------------------------------------------------
def partition(labels: np.ndarray, num_clients: int, method: str = "iid",
              alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
  """Disjoint, seeded index sets covering ``labels``: IID or Dirichlet(alpha) by class."""
  n = len(labels)
  if num_clients > n:
    raise DataError(f"more clients ({num_clients}) than training samples ({n})")
  if alpha <= 0:
    raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
  rng = np.random.default_rng([seed, 7])
  if method == "iid":
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]
  if method != "dirichlet":
    raise DataError(f"unknown partition {method!r}; expected iid or dirichlet")
  classes = np.unique(labels)
  for _ in range(10):
    parts = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for i, chunk in enumerate(np.split(idx, cuts)):
        parts[i].extend(chunk)
    if min(len(p) for p in parts) > 0:
      break
  # Large fleets at small alpha leave some clients empty in every draw: each
  # of them takes one image from the client that holds the most.
  for i in [i for i, p in enumerate(parts) if not p]:
    parts[i].append(parts[int(np.argmax([len(p) for p in parts]))].pop())
  return [np.sort(np.asarray(p, np.int64)) for p in parts]


def client_batches(part: np.ndarray, steps: int, batch_size: int, seed: int, rnd: int,
                   client: int) -> np.ndarray:
  """Indices [steps, batch] for one client in one round: epochs of seeded
  permutations of its partition, a pure function of (seed, round, client)."""
  rng = np.random.default_rng([seed, 11, rnd, client])
  need = steps * batch_size
  reps = -(-need // len(part))
  order = np.concatenate([rng.permutation(part) for _ in range(reps)])[:need]
  return order.reshape(steps, batch_size).astype(np.int32)


# -- on-device preprocessing ---------------------------------------------------------
def augment(key, images):
  """Random crop with 4-pixel zero padding and random horizontal flip; [B, H, W, C]."""
  b, h, w, _ = images.shape
  kc, kf = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  offsets = jax.random.randint(kc, (b, 2), 0, 9)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
  out = crop(padded, offsets)
  flip = jax.random.bernoulli(kf, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)


def normalize(images, mean, std):
  return (images.astype(jnp.float32) / 255.0 - mean) / std
