"""The publishers' own files for CIFAR-10, CIFAR-100 and STL-10.

The archives torchvision and the dataset pages distribute, or the folders they
unpack to:

* ``cifar-10-python.tar.gz`` -> ``cifar-10-batches-py/``: pickled dicts
  ``data_batch_1..5`` and ``test_batch`` (``data`` uint8 [10000, 3072], each
  row the R, G and B planes of a 32x32 image, row-major; ``labels``), and
  ``batches.meta`` (``label_names``).
* ``cifar-100-python.tar.gz`` -> ``cifar-100-python/``: ``train`` and ``test``
  (``data``, ``fine_labels``, ``coarse_labels``) and ``meta``
  (``fine_label_names``, ``coarse_label_names``).
* ``stl10_binary.tar.gz`` -> ``stl10_binary/``: ``train_X.bin`` /
  ``test_X.bin`` (uint8, 3x96x96 per image, each plane stored column-major),
  ``train_y.bin`` / ``test_y.bin`` (uint8 labels 1..10) and
  ``class_names.txt``. Only the 5,000 labelled training and 8,000 test images
  are read: the method trains supervised, so the 100,000 unlabelled images
  (``unlabeled_X.bin``, 2.7 GB) are not needed.

An archive is read as a stream, without unpacking to disk, and checked
against the publisher's MD5 (:data:`PUBLISHED_MD5`); the decoded arrays are
cached by that digest like the image-folder archives (``data.cache_dir``).
Pickles are read with an unpickler that admits only numpy arrays and plain
values, never arbitrary code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np


class ArchiveError(RuntimeError):
  """A publisher file that cannot be used; one line naming the problem."""


# The MD5 of each publisher archive, as the dataset pages and torchvision give it.
PUBLISHED_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
    "stl10": "91f7769df0f17e558f3565bffb0c7dfb",
}


@dataclasses.dataclass(frozen=True)
class Format:
  archive: str                 # the publisher's archive file name
  folder: str                  # the folder it unpacks to
  members: tuple               # files read (names inside ``folder``)
  decode: Callable             # (members: name -> bytes, label_mode) -> arrays, classes


# -- pickles ---------------------------------------------------------------------
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _SafeUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise pickle.UnpicklingError(f"refusing {module}.{name} (only numpy arrays are expected)")
    module = module.replace("numpy.core.", "numpy._core.") if hasattr(np, "_core") else module
    return getattr(importlib.import_module(module), name)


def _unpickle(blob: bytes, member: str) -> dict:
  try:
    obj = _SafeUnpickler(io.BytesIO(blob), encoding="latin1").load()
  except Exception as e:  # noqa: BLE001  (truncated, not a pickle, refused global)
    raise ArchiveError(f"{member} is not a readable pickle ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise ArchiveError(f"{member} holds a {type(obj).__name__}, expected a dict")
  return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(d: dict, key: str, member: str):
  if key not in d:
    raise ArchiveError(f"{member} has no '{key}' entry (it has: {', '.join(sorted(map(str, d)))})")
  return d[key]


def _names(values, member: str = "meta") -> tuple:
  if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
    raise ArchiveError(f"{member}: the class names are a {type(values).__name__}, expected a list")
  return tuple(v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values)


def _cifar_images(d: dict, member: str) -> np.ndarray:
  try:
    data = np.asarray(_field(d, "data", member))
  except (ValueError, TypeError):
    data = np.asarray(None)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise ArchiveError(f"{member}: 'data' is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _labels(values, n: int, classes: int, member: str, offset: int = 0) -> np.ndarray:
  try:
    y = np.asarray(values)
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "O" and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in y.reshape(-1))):
      raise TypeError
    y = y.astype(np.int64).reshape(-1) - offset
  except (ValueError, TypeError):
    raise ArchiveError(f"{member}: the labels are not a list of integers "
                       f"({type(values).__name__})") from None
  if len(y) != n:
    raise ArchiveError(f"{member}: {len(y)} labels for {n} images")
  if len(y) and (y.min() < 0 or y.max() >= classes):
    raise ArchiveError(f"{member}: labels run {y.min() + offset}..{y.max() + offset}, expected "
                       f"{offset}..{classes - 1 + offset}")
  return y.astype(np.int32)


def _decode_cifar10(files: dict, label_mode: str):
  classes = _names(_field(_unpickle(files["batches.meta"], "batches.meta"), "label_names",
                          "batches.meta"), "batches.meta")
  out = {}
  for split, members in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
    xs, ys = [], []
    for m in members:
      d = _unpickle(files[m], m)
      x = _cifar_images(d, m)
      xs.append(x)
      ys.append(_labels(_field(d, "labels", m), len(x), len(classes), m))
    out[split] = (np.concatenate(xs), np.concatenate(ys))
  return out, classes


def _decode_cifar100(files: dict, label_mode: str):
  meta = _unpickle(files["meta"], "meta")
  classes = _names(_field(meta, f"{label_mode}_label_names", "meta"), "meta")
  out = {}
  for split in ("train", "test"):
    d = _unpickle(files[split], split)
    x = _cifar_images(d, split)
    out[split] = (x, _labels(_field(d, f"{label_mode}_labels", split), len(x), len(classes), split))
  return out, classes


STL_SIDE = 96


def _decode_stl10(files: dict, label_mode: str):
  classes = tuple(line.strip() for line in files["class_names.txt"].decode("utf-8").splitlines()
                  if line.strip())
  plane = 3 * STL_SIDE * STL_SIDE
  out = {}
  for split in ("train", "test"):
    raw = np.frombuffer(files[f"{split}_X.bin"], np.uint8)
    if raw.size % plane:
      raise ArchiveError(f"{split}_X.bin: {raw.size} bytes is not a whole number of "
                         f"3x{STL_SIDE}x{STL_SIDE} images")
    # each channel plane is stored column-major: [N, C, W, H] -> [N, H, W, C]
    x = raw.reshape(-1, 3, STL_SIDE, STL_SIDE).transpose(0, 3, 2, 1)
    y = _labels(np.frombuffer(files[f"{split}_y.bin"], np.uint8), len(x), len(classes),
                f"{split}_y.bin", offset=1)
    out[split] = (np.ascontiguousarray(x), y)
  return out, classes


FORMATS = {
    "cifar10": Format("cifar-10-python.tar.gz", "cifar-10-batches-py",
                      ("batches.meta", "test_batch") + tuple(f"data_batch_{i}" for i in range(1, 6)),
                      _decode_cifar10),
    "cifar100": Format("cifar-100-python.tar.gz", "cifar-100-python", ("meta", "train", "test"),
                       _decode_cifar100),
    "stl10": Format("stl10_binary.tar.gz", "stl10_binary",
                    ("class_names.txt", "train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"),
                    _decode_stl10),
}


# -- finding and reading ------------------------------------------------------------
def locate(name: str, folder: Path) -> Path | None:
  """The publisher archive or unpacked folder of ``name`` in ``folder``: the
  archive by its own name, the folder it unpacks to, or ``folder`` itself when
  it holds the files. None when there is none."""
  fmt = FORMATS[name]
  folder = Path(folder)
  for path in (folder / fmt.archive, folder / fmt.folder, folder):
    if path.is_file() or (path.is_dir() and (path / fmt.members[0]).is_file()):
      return path
  return None


def file_digest(path: Path, algorithm: str = "md5") -> str:
  """Hex digest of a file, read in 4 MiB blocks."""
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def read_members(name: str, path: Path) -> dict:
  """The bytes of every member ``name`` needs, from the archive ``path`` (read
  as a stream) or the unpacked folder ``path``. Errors name the file and what
  is wrong with it."""
  fmt = FORMATS[name]
  need = set(fmt.members)
  if path.is_dir():
    missing = sorted(m for m in need if not (path / m).is_file())
    if missing:
      raise ArchiveError(f"{path} lacks {', '.join(missing)} (the files of {fmt.folder}/)")
    return {m: (path / m).read_bytes() for m in need}
  files: dict = {}
  seen: list = []
  try:
    with tarfile.open(path, mode="r|gz") as tar:
      for member in tar:
        base = member.name.rstrip("/").split("/")[-1]
        seen.append(member.name)
        if member.isfile() and base in need and base not in files:
          files[base] = tar.extractfile(member).read()
          if len(files) == len(need):
            break
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise ArchiveError(f"{path} is truncated or damaged ({type(e).__name__}: "
                       f"{str(e) or 'unexpected end of data'})") from None
  missing = sorted(need - set(files))
  if missing:
    raise ArchiveError(f"{path} has no member {', '.join(missing)} (it holds "
                       f"{len(seen)} entries: {', '.join(seen[:6])}{', ...' if len(seen) > 6 else ''})")
  return files


def load(name: str, path: Path, label_mode: str = "fine", digest: str | None = None):
  """Decode ``name`` from its publisher archive or folder ``path``:
  ``({"train": (images uint8 [N, H, W, 3], labels int32 [N]), "test": ...}, class names)``.

  ``digest``: the archive's MD5 (:func:`file_digest`), taken by the caller,
  which keys its cache by it. An archive whose MD5 is not the publisher's is
  refused after its members were read (so a truncated or incomplete archive
  is named as such)."""
  if path.is_file() and digest is None:
    digest = file_digest(path)
  files = read_members(name, path)
  splits, classes = FORMATS[name].decode(files, label_mode)
  want = PUBLISHED_MD5.get(name)
  if digest is not None and want and digest != want:
    raise ArchiveError(f"{path} has MD5 {digest}, not the publisher's {want}: the archive is "
                       f"damaged or altered; download it again, or unpack your copy and point "
                       f"data_dir at the folder")
  return splits, classes
