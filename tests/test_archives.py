"""The publishers' CIFAR-10, CIFAR-100 and STL-10 files, built here in their
exact formats (a few images each), as archives and as unpacked folders."""
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hsee_jax import archives
from hsee_jax import data as data_lib
from hsee_jax.config import Config, ConfigError
from hsee_jax.data import DataError


def _pickle(d: dict) -> bytes:
  # the publishers' pickles come from Python 2: byte-string keys and names
  return pickle.dumps({k.encode(): v for k, v in d.items()}, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
  """[N, 32, 32, 3] -> the publisher's rows: R, G, B planes, each row-major."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _images(rng, n, side=32):
  return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def cifar10_files(rng):
  names = [f"class{i}".encode() for i in range(10)]
  files, truth = {"batches.meta": _pickle({"label_names": names, "num_vis": 3072})}, {}
  for m, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
    x, y = _images(rng, n), rng.integers(0, 10, n).tolist()
    files[m] = _pickle({"data": _cifar_rows(x), "labels": y, "batch_label": m.encode()})
    truth[m] = (x, y)
  train = [truth[f"data_batch_{i}"] for i in range(1, 6)]
  return files, {"train": (np.concatenate([t[0] for t in train]), sum((t[1] for t in train), [])),
                 "test": truth["test_batch"]}


def cifar100_files(rng):
  files = {"meta": _pickle({"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                            "coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})}
  truth = {}
  for split, n in (("train", 6), ("test", 4)):
    x = _images(rng, n)
    fine = rng.integers(0, 100, n).tolist()
    coarse = [f // 5 for f in fine]
    files[split] = _pickle({"data": _cifar_rows(x), "fine_labels": fine, "coarse_labels": coarse})
    truth[split] = (x, fine, coarse)
  return files, truth


def stl10_files(rng):
  files = {"class_names.txt": "\n".join(f"animal{i}" for i in range(10)).encode() + b"\n"}
  truth = {}
  for split, n in (("train", 10), ("test", 5)):
    x = _images(rng, n, 96)
    x[0] = 0
    x[0, 0, 5, 0] = 255     # image 0: one red pixel in the top row, column 5
    y = rng.integers(0, 10, n)
    # the publisher stores each channel plane column-major: [N, C, W, H]
    files[f"{split}_X.bin"] = x.transpose(0, 3, 2, 1).tobytes()
    files[f"{split}_y.bin"] = (y + 1).astype(np.uint8).tobytes()
    truth[split] = (x, y)
  return files, truth


BUILDERS = {"cifar10": cifar10_files, "cifar100": cifar100_files, "stl10": stl10_files}


def write(name: str, folder: Path, files: dict, archive: bool = True, skip=()) -> Path:
  """The files as the publisher ships them: ``<folder>/<archive>.tar.gz`` holding
  ``<unpacked>/<member>``, or the unpacked folder itself."""
  fmt = archives.FORMATS[name]
  folder.mkdir(parents=True, exist_ok=True)
  if not archive:
    (folder / fmt.folder).mkdir()
    for m, blob in files.items():
      if m not in skip:
        (folder / fmt.folder / m).write_bytes(blob)
    return folder / fmt.folder
  path = folder / fmt.archive
  with tarfile.open(path, "w:gz") as tar:
    for m, blob in files.items():
      if m in skip:
        continue
      info = tarfile.TarInfo(f"{fmt.folder}/{m}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return path


@pytest.fixture
def published(monkeypatch, tmp_path):
  """Make the archives these tests write count as the publisher's (their MD5s)."""
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))

  def publish(name, path):
    monkeypatch.setitem(archives.PUBLISHED_MD5, name,
                        hashlib.md5(Path(path).read_bytes()).hexdigest())
  return publish


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_archive_and_folder_decode_to_the_publishers_images(name, tmp_path, published):
  files, truth = BUILDERS[name](np.random.default_rng(0))
  path = write(name, tmp_path / "a", files)
  published(name, path)
  write(name, tmp_path / "f", files, archive=False)
  from_archive = data_lib.load_dataset(Config(dataset=name, data_dir=str(tmp_path / "a")))
  from_folder = data_lib.load_dataset(Config(dataset=name, data_dir=str(tmp_path / "f")))
  for ds in (from_archive, from_folder):
    assert ds.name == name
    np.testing.assert_array_equal(ds.train_images, truth["train"][0])
    np.testing.assert_array_equal(ds.train_labels, np.asarray(truth["train"][1]))
    np.testing.assert_array_equal(ds.test_images, truth["test"][0])
    np.testing.assert_array_equal(ds.test_labels, np.asarray(truth["test"][1]))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert from_archive.class_names == from_folder.class_names
  assert from_archive.class_names[:2] == {"cifar10": ("class0", "class1"),
                                          "cifar100": ("fine0", "fine1"),
                                          "stl10": ("animal0", "animal1")}[name]
  assert len(list((tmp_path / "cache").glob(f"{name}-fine-*.npz"))) == 1  # archive cached
  again = data_lib.load_dataset(Config(dataset=name, data_dir=str(tmp_path / "a")))
  np.testing.assert_array_equal(again.test_images, from_archive.test_images)


def test_stl10_is_the_right_way_up_at_96(tmp_path, published):
  files, _ = stl10_files(np.random.default_rng(1))
  published("stl10", write("stl10", tmp_path, files))
  ds = data_lib.load_dataset(Config(dataset="stl10", data_dir=str(tmp_path)))
  assert ds.image_shape == (96, 96, 3)
  img = ds.train_images[0]
  assert img[0, 5, 0] == 255 and img.sum() == 255   # not at row 5, column 0 (transposed)


def test_cifar100_fine_and_coarse_labels(tmp_path, published):
  files, truth = cifar100_files(np.random.default_rng(2))
  published("cifar100", write("cifar100", tmp_path, files))
  fine = data_lib.load_dataset(Config(dataset="cifar100", data_dir=str(tmp_path)))
  coarse = data_lib.load_dataset(Config(dataset="cifar100", data_dir=str(tmp_path),
                                        label_mode="coarse"))
  assert fine.num_classes == 100 and coarse.num_classes == 20
  assert coarse.class_names[3] == "coarse3"
  np.testing.assert_array_equal(fine.train_labels, truth["train"][1])
  np.testing.assert_array_equal(coarse.train_labels, truth["train"][2])
  np.testing.assert_array_equal(fine.train_images, coarse.train_images)
  with pytest.raises(ConfigError, match="label_mode: 'coarse' has no effect in this config: it needs dataset=cifar100"):
    Config(dataset="stl10", label_mode="coarse")


def test_damaged_archives_give_one_line_errors(tmp_path, published):
  files, _ = cifar10_files(np.random.default_rng(3))
  good = write("cifar10", tmp_path / "good", files)
  # not the publisher's MD5 (nothing patched): refused, named
  with pytest.raises(DataError, match="cifar-10-python.tar.gz has MD5 [0-9a-f]{32}, not the "
                     "publisher's c58f30108f718f92721af3b95e74349a") as e:
    data_lib.load_dataset(Config(dataset="cifar10", data_dir=str(tmp_path / "good")))
  errors = [e.value]
  # truncated
  (tmp_path / "cut").mkdir()
  blob = good.read_bytes()
  (tmp_path / "cut" / good.name).write_bytes(blob[:len(blob) // 2])
  published("cifar10", tmp_path / "cut" / good.name)
  with pytest.raises(DataError, match="dataset cifar10: .* is truncated or damaged") as e:
    data_lib.load_dataset(Config(dataset="cifar10", data_dir=str(tmp_path / "cut")))
  errors.append(e.value)
  # a member missing, from the archive and from the folder
  published("cifar10", write("cifar10", tmp_path / "part", files, skip=("data_batch_3",)))
  with pytest.raises(DataError, match="has no member data_batch_3 \\(it holds 6 entries") as e:
    data_lib.load_dataset(Config(dataset="cifar10", data_dir=str(tmp_path / "part")))
  errors.append(e.value)
  write("cifar10", tmp_path / "pf", files, archive=False, skip=("test_batch",))
  with pytest.raises(DataError, match="cifar-10-batches-py lacks test_batch") as e:
    data_lib.load_dataset(Config(dataset="cifar10", data_dir=str(tmp_path / "pf")))
  errors.append(e.value)
  # a pickle that would run code is refused, not run
  evil = dict(files, test_batch=b"cos\nsystem\n(S'echo pwned'\ntR.")
  published("cifar10", write("cifar10", tmp_path / "evil", evil))
  with pytest.raises(DataError, match="test_batch is not a readable pickle .*refusing os.system") as e:
    data_lib.load_dataset(Config(dataset="cifar10", data_dir=str(tmp_path / "evil")))
  errors.append(e.value)
  assert all("\n" not in str(err) for err in errors)


@pytest.mark.long
def test_stl10_trains_at_96_with_proportional_padding(tmp_path, published):
  import jax

  from hsee_jax import costs, models
  from hsee_jax import train as train_lib
  files, _ = stl10_files(np.random.default_rng(4))
  published("stl10", write("stl10", tmp_path / "d", files))
  cfg = Config(dataset="stl10", data_dir=str(tmp_path / "d"), width=0.0625, cuts=(2,),
               rounds=1, local_steps=1, batch_size=4, eval_batch_size=5, checkpoint_every=0)
  summary = train_lib.train(cfg, tmp_path / "run", log=lambda s: None)
  assert summary["rounds"] == 1 and summary["test"]["cuts"][0]["cut"] == 2
  # the cost table is taken at the real image size: 9x the pixels of 32x32
  net = models.SplitResNet18(10, 0.0625, "linear")
  f96, f32 = (costs.cut_costs(net, 2, shape)["client_train_flops"]
              for shape in ((96, 96, 3), (32, 32, 3)))
  assert 8.5 < f96 / f32 < 9.5
  # crop padding in proportion: 12 pixels at 96 (a shifted crop leaves a zero border)
  x = np.full((64, 96, 96, 3), 200, np.uint8)
  out = np.asarray(data_lib.augment(jax.random.PRNGKey(0), x, cfg.augment_pad))
  zero_rows = [(o == 0).all(axis=(1, 2)).sum() for o in out]
  assert max(zero_rows) == 12 and 0 in zero_rows


def test_tfds_path_loads_cifar100_and_stl10_under_mock_data(tmp_path):
  """The ``[tfds]`` loader, in its own process (TensorFlow stays out of the
  test process; a native abort would show as a non-zero exit, not a hang)."""
  import json
  import subprocess
  import sys
  empty = tmp_path / "none"
  empty.mkdir()
  code = f"""
import json
import tensorflow_datasets as tfds
from hsee_jax import data
from hsee_jax.config import Config
out = {{}}
with tfds.testing.mock_data(num_examples=12):
  for name, mode in (("cifar100", "fine"), ("cifar100", "coarse"), ("stl10", "fine")):
    ds = data.load_dataset(Config(dataset=name, data_dir={str(empty)!r}, label_mode=mode))
    out[name + "/" + mode] = dict(train=list(ds.train_images.shape), test=list(ds.test_images.shape),
        classes=ds.num_classes, dtype=str(ds.train_images.dtype),
        labels=[int(ds.train_labels.min()), int(ds.train_labels.max())])
print(json.dumps(out))
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["cifar100/fine"]["train"] == [12, 32, 32, 3] and out["cifar100/fine"]["classes"] == 100
  assert out["cifar100/coarse"]["classes"] == 20 and out["cifar100/coarse"]["labels"][1] < 20
  assert out["stl10/fine"]["train"] == [12, 96, 96, 3] and out["stl10/fine"]["classes"] == 10
  assert all(v["dtype"] == "uint8" and v["test"][0] == 12 and v["labels"][0] >= 0
             for v in out.values())


def test_batches_with_fields_of_the_wrong_type_are_one_line_errors(tmp_path):
  """The right container, the wrong contents: labels that are not integers,
  class names that are not a list, images that are not an array."""
  files, _ = cifar10_files(np.random.default_rng(4))
  good = pickle.loads(files["data_batch_2"], encoding="bytes")
  cases = [
      ("data_batch_2", {**good, b"labels": "0123"}, "data_batch_2: the labels are not a list of integers (str)"),
      ("data_batch_2", {**good, b"labels": [0.5, 1.5, 2.5]}, "the labels are not a list of integers"),
      ("data_batch_2", {**good, b"labels": [None, 1, 2]}, "the labels are not a list of integers"),
      ("data_batch_2", {**good, b"data": {"a": 1}}, "data_batch_2: 'data' is object"),
      ("batches.meta", {b"label_names": 10}, "batches.meta: the class names are a int, expected a list"),
  ]
  for i, (member, d, msg) in enumerate(cases):
    broken = dict(files, **{member: pickle.dumps(d, protocol=2)})
    folder = write("cifar10", tmp_path / f"b{i}", broken, archive=False)
    with pytest.raises(DataError) as e:
      data_lib.load_dataset(Config(dataset="cifar10", data_dir=str(folder.parent)))
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
