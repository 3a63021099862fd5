import hashlib
import sys
import zipfile

import jax
import numpy as np
import pytest

from conftest import cifar10_dir, write_image_zip
from hsee_jax import archives
from hsee_jax import data as data_lib
from hsee_jax.config import Config
from hsee_jax.data import DataError


def test_cifar10_subset_loads(cifar10_small):
  ds = cifar10_small
  assert ds.train_images.shape == (600, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (300, 32, 32, 3)
  assert ds.class_names[0] == "airplane" and ds.num_classes == 10
  assert set(np.unique(ds.train_labels)) == set(range(10))
  assert np.all((ds.mean > 0.3) & (ds.mean < 0.6)) and np.all((ds.std > 0.15) & (ds.std < 0.35))


def test_cifar10_sha256sums_match_the_shipped_archives():
  folder = cifar10_dir()
  sums = data_lib._expected_sums(folder)
  assert set(sums) == {"train.zip", "test.zip"}
  assert archives.file_digest(folder / "test.zip", "sha256") == sums["test.zip"]


def test_imagefolder_labels_from_sorted_class_names(image_folder, tmp_path, monkeypatch):
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))
  ds = data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(image_folder)))
  assert ds.class_names == ("ant", "bee", "cat")
  assert ds.train_images.shape == (36, 8, 8, 3) and ds.test_images.shape == (12, 8, 8, 3)
  # the fixture makes "cat" darkest, "ant" middle, "bee" brightest
  mean_by_label = [ds.train_images[ds.train_labels == k].mean() for k in range(3)]
  assert mean_by_label[1] > mean_by_label[0] > mean_by_label[2]
  # second load comes from the cache and is identical
  again = data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(image_folder)))
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  assert list((tmp_path / "cache").glob("train-*.npz"))


def test_missing_archive(tmp_path):
  (tmp_path / "d").mkdir()
  with pytest.raises(DataError, match="train.zip not found"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(tmp_path / "d")))
  with pytest.raises(DataError, match="data folder .* not found"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(tmp_path / "none")))


def test_class_problems_are_named(tmp_path, monkeypatch):
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))
  folder = tmp_path / "mismatch"
  folder.mkdir()
  write_image_zip(folder / "train.zip", ["ant", "bee", "cat"], 2, seed=1)
  write_image_zip(folder / "test.zip", ["ant", "bee", "dog"], 2, seed=2)
  with pytest.raises(DataError, match="only in train: cat; only in test: dog"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(folder)))
  one = tmp_path / "one"   # one class would give NaN entropies (normalised by log 1)
  one.mkdir()
  write_image_zip(one / "train.zip", ["ant"], 3, seed=1)
  write_image_zip(one / "test.zip", ["ant"], 2, seed=2)
  with pytest.raises(DataError, match="1 class \\(ant\\); classification needs at least 2"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(one)))
  with pytest.raises(DataError, match="set data_dir in the config to a folder holding "
                     "train.zip and test.zip"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(tmp_path / "none")))


def test_truncated_archive(image_folder, tmp_path, monkeypatch):
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))
  blob = (image_folder / "train.zip").read_bytes()
  (image_folder / "train.zip").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(DataError, match="train.zip is not a readable zip"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(image_folder)))


def test_altered_archive_fails_checksum(image_folder, tmp_path, monkeypatch):
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))
  digest = hashlib.sha256((image_folder / "train.zip").read_bytes()).hexdigest()
  (image_folder / "SHA256SUMS").write_text(f"{digest}  train.zip\n")
  data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(image_folder)))  # fine
  with zipfile.ZipFile(image_folder / "train.zip", "a") as zf:
    zf.writestr("cat/extra.png", b"not an image")
  with pytest.raises(DataError, match="corrupt or altered .*SHA256SUMS"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(image_folder)))


def test_unreadable_image_and_mixed_sizes(tmp_path, monkeypatch):
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))
  folder = tmp_path / "bad"
  folder.mkdir()
  write_image_zip(folder / "train.zip", ["a", "b"], 3)
  write_image_zip(folder / "test.zip", ["a", "b"], 2)
  with zipfile.ZipFile(folder / "train.zip", "a") as zf:
    zf.writestr("a/broken.png", b"garbage")
  with pytest.raises(DataError, match="cannot read a/broken.png"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(folder)))
  write_image_zip(folder / "train.zip", ["a", "b"], 3, size=(8, 8))
  write_image_zip(folder / "test.zip", ["a", "b"], 2, size=(6, 6))
  with pytest.raises(DataError, match="differ in size"):
    data_lib.load_dataset(Config(dataset="imagefolder", data_dir=str(folder)))


def test_tfds_datasets_without_data_give_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as without the [tfds] extra
  with pytest.raises(DataError, match="dataset cifar100: no files found and tensorflow-datasets "
                     "is not installed; put cifar-100-python.tar.gz, its folder "
                     "cifar-100-python/, or train.zip and test.zip") as e:
    data_lib.load_dataset(Config(dataset="cifar100", data_dir=str(tmp_path / "c100")))
  assert "\n" not in str(e.value)


def test_local_archive_serves_stl10(image_folder, tmp_path, monkeypatch):
  monkeypatch.setenv("HSEE_CACHE_DIR", str(tmp_path / "cache"))
  ds = data_lib.load_dataset(Config(dataset="stl10", data_dir=str(image_folder)))
  assert ds.name == "stl10" and ds.num_classes == 3


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partitions_disjoint_complete_seeded(method):
  labels = np.random.default_rng(0).integers(0, 10, 2000)
  parts = data_lib.partition(labels, 7, method, alpha=0.3, seed=5)
  allidx = np.concatenate(parts)
  assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
  assert all(len(p) > 0 for p in parts)
  again = data_lib.partition(labels, 7, method, alpha=0.3, seed=5)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  other = data_lib.partition(labels, 7, method, alpha=0.3, seed=6)
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _label_skew(labels, parts):
  glob = np.bincount(labels, minlength=10) / len(labels)
  return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum()
                  for p in parts])


def test_dirichlet_skew_grows_as_alpha_shrinks():
  labels = np.random.default_rng(0).integers(0, 10, 5000)
  skews = [np.mean([_label_skew(labels, data_lib.partition(labels, 5, "dirichlet", a, s))
                    for s in range(3)]) for a in (100.0, 1.0, 0.1)]
  iid = _label_skew(labels, data_lib.partition(labels, 5, "iid"))
  assert iid < 0.05
  assert skews[0] < skews[1] < skews[2]
  assert skews[2] > 0.4


def test_partition_bad_inputs():
  with pytest.raises(DataError, match="more clients \\(5\\) than training samples \\(3\\)"):
    data_lib.partition(np.zeros(3, int), 5)
  with pytest.raises(DataError, match="alpha must be > 0"):
    data_lib.partition(np.zeros(30, int), 2, "dirichlet", alpha=0.0)


def test_client_batches_cover_partition_each_epoch():
  part = np.arange(100, 150)
  idx = data_lib.client_batches(part, steps=5, batch_size=10, seed=0, rnd=3, client=1)
  assert idx.shape == (5, 10) and sorted(idx.ravel().tolist()) == part.tolist()
  assert np.array_equal(idx, data_lib.client_batches(part, 5, 10, 0, 3, 1))
  assert not np.array_equal(idx, data_lib.client_batches(part, 5, 10, 0, 4, 1))


def test_augment_crops_and_flips():
  x = np.arange(2 * 6 * 6 * 1, dtype=np.float32).reshape(2, 6, 6, 1) + 1
  outs = [np.asarray(data_lib.augment(jax.random.PRNGKey(s), x)) for s in range(20)]
  assert all(o.shape == x.shape for o in outs)
  assert any(np.array_equal(o[0], x[0, :, ::-1]) for o in outs)      # a pure flip
  assert any((o == 0).any() for o in outs)                            # a shifted crop (zero pad)
  for o in outs:  # every non-padding pixel comes from the image
    assert set(np.unique(o[0])) <= set(np.unique(x[0])) | {0.0}


def _zip_of(path, images: dict):
  """A one-class-per-image archive: name -> (Pillow image, format)."""
  import io

  with zipfile.ZipFile(path, "w") as zf:
    for i, (name, (im, fmt)) in enumerate(images.items()):
      buf = io.BytesIO()
      im.save(buf, format=fmt)
      zf.writestr(f"{name}/{i:03d}.{fmt.lower()}", buf.getvalue())


def test_every_image_mode_is_scaled_to_8_bits_or_refused(tmp_path):
  """16-bit grayscale is scaled by 255/65535 (Pillow's RGB conversion would
  clip it to white), 8-bit modes convert as Pillow does, float images are
  refused in one line naming the file."""
  from PIL import Image
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 65536, (4, 4)).astype(np.uint16)
  rgb = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
  images = {
      "a16": (Image.fromarray(wide), "PNG"),                               # mode I;16
      "b32": (Image.fromarray(wide.astype(np.int32)), "TIFF"),            # mode I, 16-bit values
      "c_gray": (Image.fromarray(rgb[..., 0]), "PNG"),                     # L
      "d_rgba": (Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"),  # RGBA: alpha dropped
      "e_pal": (Image.fromarray(rgb).quantize(8), "PNG"),                  # P
      "f_bits": (Image.fromarray(rgb[..., 0] > 127), "PNG"),              # 1
  }
  _zip_of(tmp_path / "ok.zip", images)
  got, labels, classes = data_lib.decode_archive(tmp_path / "ok.zip")
  want16 = np.round(wide * (255 / 65535)).astype(np.uint8)
  assert classes == tuple(images) and list(labels) == list(range(6))
  np.testing.assert_array_equal(got[0], np.repeat(want16[..., None], 3, -1))
  np.testing.assert_array_equal(got[1], got[0])
  np.testing.assert_array_equal(got[2], np.repeat(rgb[..., :1], 3, -1))
  np.testing.assert_array_equal(got[3], rgb)
  np.testing.assert_array_equal(got[4], np.asarray(images["e_pal"][0].convert("RGB")))
  np.testing.assert_array_equal(got[5], np.repeat(np.where(rgb[..., :1] > 127, 255, 0), 3, -1))
  assert got[0].max() < 255 or want16.max() == 255        # not clipped to white
  # a float image and a 32-bit integer image beyond 16 bits: one line each, the file named
  for name, im in (("g_float", Image.fromarray(rng.random((4, 4)).astype(np.float32))),
                   ("h_int", Image.fromarray(np.full((4, 4), 70000, np.int32)))):
    _zip_of(tmp_path / f"{name}.zip", {name: (im, "TIFF"), "zz": (Image.fromarray(rgb), "PNG")})
    with pytest.raises(DataError) as e:
      data_lib.decode_archive(tmp_path / f"{name}.zip")
    msg = str(e.value)
    assert f"{name}/000.tiff in " in msg and "no 8-bit scale" in msg and "\n" not in msg
