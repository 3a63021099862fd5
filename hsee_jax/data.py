"""Datasets, client partitions and on-device augmentation.

* ``cifar10``, ``cifar100``, ``stl10``: the publisher's archive
  (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``,
  ``stl10_binary.tar.gz``) or the folder it unpacks to, read by
  :mod:`hsee_jax.archives`; or a ``train.zip`` and ``test.zip`` of
  ``<class>/<image>`` files (the layout of the shipped CIFAR-10 JPEG copy,
  used first when present); else (CIFAR-100, STL-10) ``tensorflow_datasets``
  (the ``[tfds]`` extra, with a network or a prepared ``TFDS_DATA_DIR``).
* ``imagefolder``: a ``train.zip`` and a ``test.zip`` holding
  ``<class>/<file>`` images that Pillow reads, all of one size; labels are the
  sorted class names. Archives are checked against ``SHA256SUMS`` when the
  folder has one.
* ``synthetic``: seeded random images with a per-class pattern, for
  benchmarks and tests that need no files.

Archives are decoded once and cached as uint8 arrays, keyed by their digest.
Where the data lives: ``Config.data_dir`` if set, else ``$HSEE_DATA_DIR/<dataset>``,
else ``<repo>/../shared/data/<dataset>``.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hsee_jax import archives
from hsee_jax.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class DataError(RuntimeError):
  """Data that cannot be used; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset in memory: uint8 NHWC images and int32 labels, train and test;
  ``mean`` / ``std`` are the train set's per-channel statistics in [0, 1]."""
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
  """Load, subset and sanity-check the dataset a config names.

  Args:
    cfg: reads ``dataset`` (cifar10 | cifar100 | stl10 | synthetic),
      ``data_dir``, ``train_subset``, ``test_subset`` (and ``synthetic_shape``,
      ``seed`` for synthetic data); docs/usage.md says where files are looked for.
  Returns:
    A :class:`Dataset` (uint8 NHWC images, int32 labels, train statistics).
  Raises:
    DataError: one line naming the file or value that cannot be used.
  """
  if cfg.dataset == "synthetic":
    ds = synthetic_dataset(cfg.synthetic_shape, cfg.seed)
  else:
    folder = data_folder(cfg)
    publisher = (archives.locate(cfg.dataset, folder) if cfg.dataset in archives.FORMATS
                 and not (folder / "train.zip").exists() else None)
    if publisher is not None:
      ds = load_publisher(cfg.dataset, publisher, cfg.label_mode)
    elif cfg.dataset in ("cifar10", "imagefolder") or (folder / "train.zip").exists():
      ds = load_image_folder(folder, cfg.dataset)
    else:
      ds = _load_tfds(cfg.dataset, folder, cfg.label_mode)
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
    also = f" or {archives.FORMATS[name].archive}" if name in archives.FORMATS else ""
    raise DataError(
        f"dataset {name}: data folder {folder} not found; set data_dir in the config to a "
        f"folder holding train.zip and test.zip{also} (or HSEE_DATA_DIR to a folder holding "
        f"{name}/train.zip and {name}/test.zip)")
  expected = _expected_sums(folder)
  splits = {}
  for split in ("train", "test"):
    path = folder / f"{split}.zip"
    if not path.is_file():
      also = (f", or the publisher's {archives.FORMATS[name].archive} or its folder "
              f"{archives.FORMATS[name].folder}/" if name in archives.FORMATS else "")
      raise DataError(f"dataset {name}: archive {path} not found (need train.zip and test.zip"
                      f"{also})")
    digest = archives.file_digest(path, "sha256")
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


def _cached(key: str, build) -> dict:
  """``build()`` (a dict of arrays), cached in ``cache_dir()/<key>.npz``."""
  cache = cache_dir() / f"{key}.npz"
  if cache.exists():
    try:
      with np.load(cache, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except Exception:  # a broken cache file is rebuilt, never trusted
      pass
  arrays = build()
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
  except OSError:
    pass  # no writable cache: decode again next time
  return arrays


DECODE_VERSION = 2  # in the decode cache's key: raised whenever decoding changes (2: rgb8)


def _cached_decode(path: Path, digest: str, name: str):
  def build():
    images, labels, classes = decode_archive(path, name)
    return {"images": images, "labels": labels, "classes": np.array(classes)}
  z = _cached(f"{path.stem}-{digest[:20]}-d{DECODE_VERSION}", build)
  return z["images"], z["labels"], tuple(str(c) for c in z["classes"])


# -- publisher archives ------------------------------------------------------------
def load_publisher(name: str, path: Path, label_mode: str = "fine") -> Dataset:
  """``name`` from its publisher archive or unpacked folder (:mod:`hsee_jax.archives`).
  An archive is cached by its MD5 once it matched the publisher's; a folder
  is read each time (a second or two)."""
  def build(digest=None):
    splits, classes = archives.load(name, path, label_mode, digest)
    return {"train_images": splits["train"][0], "train_labels": splits["train"][1],
            "test_images": splits["test"][0], "test_labels": splits["test"][1],
            "classes": np.array(classes)}
  try:
    digest = archives.file_digest(path) if path.is_file() else None  # one pass; load reuses it
    if digest is not None:
      known = digest == archives.PUBLISHED_MD5.get(name)
      make = lambda: build(digest)
      z = _cached(f"{name}-{label_mode}-{digest[:20]}", make) if known else make()
    else:
      z = build()
  except (archives.ArchiveError, OSError) as e:
    raise DataError(f"dataset {name}: {e}") from None
  classes = tuple(str(c) for c in z["classes"])
  if z["train_images"].shape[1:] != z["test_images"].shape[1:]:
    raise DataError(f"dataset {name}: train and test images differ in size")
  return Dataset(name, z["train_images"], z["train_labels"], z["test_images"], z["test_labels"],
                 classes)


# Pillow's integer modes wider than 8 bits: 16-bit grayscale (PNG, TIFF) opens
# as one of these, with values 0..65535; ``convert("RGB")`` would clip them to 255.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb8(im) -> np.ndarray:
  """A Pillow image as uint8 RGB [H, W, 3], every mode scaled faithfully.

  8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``LA``, ``CMYK``,
  ``YCbCr``, ...) go through Pillow's conversion (alpha dropped); Pillow
  already reads 16-bit-per-channel colour PNGs as 8-bit ``RGB``. 16-bit
  grayscale (``I;16*``, and ``I`` holding values in 0..65535) is scaled by
  255 / 65535. Other modes (32-bit float ``F``, ``I`` outside 16 bits)
  raise :class:`DataError` saying what the image is.
  """
  if im.mode in WIDE_MODES:
    a = np.asarray(im).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise DataError(f"is a 32-bit integer image (mode {im.mode}, values {a.min()}..{a.max()}) "
                      f"with no 8-bit scale; convert it to 8-bit RGB")
    gray = np.round(a * (255 / 65535)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if im.mode == "F":
    raise DataError("is a 32-bit float image (mode F) with no 8-bit scale; convert it to "
                    "8-bit RGB")
  return np.asarray(im.convert("RGB"), dtype=np.uint8)


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
          arr = rgb8(im)
      except DataError as e:
        raise DataError(f"dataset {name}: {m} in {path} {e}") from None
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


def _load_tfds(name: str, folder: Path, label_mode: str = "fine") -> Dataset:
  """``name`` through tensorflow-datasets (``[tfds]`` extra): each split read
  in batches of 1,024 and stacked here. ``tfds.load(..., batch_size=-1)`` is
  not used: it batches a split by the example count in the dataset's split
  metadata, and where that is missing (as under ``tfds.testing.mock_data``)
  by ``sys.maxsize``, which aborts the process inside tf.data
  (``std::length_error: vector::reserve``), past any Python error handling."""
  fmt = archives.FORMATS.get(name)
  local = (f"{fmt.archive}, its folder {fmt.folder}/, or train.zip and test.zip "
           f"(<class>/<image> layout)" if fmt else "train.zip and test.zip (<class>/<image> layout)")
  hint = (f"put {local} in {folder}, or pip install 'hsee_jax[tfds]' with a network "
          f"(or a prepared TFDS_DATA_DIR)")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"dataset {name}: no files found and tensorflow-datasets is not "
                    f"installed; {hint}") from None
  label_key = "coarse_label" if label_mode == "coarse" else "label"
  try:
    builder = tfds.builder(name)
    builder.download_and_prepare()
    splits = {}
    for split in ("train", "test"):
      images, labels = [], []
      for ex in tfds.as_numpy(builder.as_dataset(split=split, batch_size=1024)):
        images.append(ex["image"])
        labels.append(ex[label_key])
      splits[split] = (np.concatenate(images).astype(np.uint8),
                       np.concatenate(labels).astype(np.int32))
    classes = tuple(builder.info.features[label_key].names)
  except Exception as e:  # noqa: BLE001
    msg = str(e).splitlines()[0] if str(e) else ""
    raise DataError(f"dataset {name}: tensorflow-datasets could not load it "
                    f"({type(e).__name__}: {msg}); {hint}") from None
  return Dataset(name, *splits["train"], *splits["test"], classes)


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
  """Split a train set among clients.

  Args:
    labels: [N] integer labels of the train set.
    num_clients: how many index sets to make.
    method: ``iid`` (a seeded shuffle cut into near-equal sets) or
      ``dirichlet`` (each class spread over the clients by Dirichlet(``alpha``)).
    seed: the partition's seed.
  Returns:
    ``num_clients`` disjoint, sorted arrays of indices into ``labels``,
    together covering all of them, none empty.
  Raises:
    DataError: more clients than samples, ``alpha`` <= 0, an unknown method.
  """
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
def augment(key, images, pad_share: float = 0.125):
  """Random crop of the image zero-padded by ``pad_share`` of its side on each
  edge (4 pixels at 32x32, 12 at 96x96), and a random horizontal flip; [B, H, W, C]."""
  b, h, w, _ = images.shape
  pad = int(round(pad_share * h))
  kc, kf = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(kc, (b, 2), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
  out = crop(padded, offsets)
  flip = jax.random.bernoulli(kf, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)


def normalize(images, mean, std):
  return (images.astype(jnp.float32) / 255.0 - mean) / std
