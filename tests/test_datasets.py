"""Tests for tf_large_margin.datasets (offline: all files are written here)."""

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import datasets

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------------------
# Tiny writers for test files
# ---------------------------------------------------------------------------


def random_images(n, shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def random_labels(n, seed=0):
  return np.random.default_rng(seed).integers(0, 10, n).astype(np.int64)


def write_file(path, data):
  """Writes raw bytes, gzipped if the name ends in .gz; returns the path."""
  path = str(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)
  return path


def idx_bytes(magic, dims, payload):
  """Builds IDX file bytes from a magic number, header dims and a payload."""
  return struct.pack(f">{1 + len(dims)}I", magic, *dims) + bytes(payload)


def write_mnist_dir(directory, n_train=12, n_test=5, suffix=".gz"):
  """Writes a small random MNIST-format data set; returns the arrays."""
  arrays = (
      random_images(n_train, (28, 28, 1), 1),
      random_labels(n_train, 2),
      random_images(n_test, (28, 28, 1), 3),
      random_labels(n_test, 4),
  )
  writers = (datasets.write_idx_images, datasets.write_idx_labels) * 2
  for key, writer, array in zip(IDX_NAMES, writers, arrays):
    writer(os.path.join(directory, IDX_NAMES[key] + suffix), array)
  return arrays


def cifar_records(images, labels):
  """CIFAR-10 binary records: label byte + CHW pixels, for HWC images."""
  chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  return np.concatenate([labels.astype(np.uint8)[:, None], chw], axis=1).tobytes()


def cifar_pickle(images, labels, protocol=2):
  """CIFAR-10 python batch bytes for HWC images."""
  data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  batch = {b"batch_label": b"test", b"data": data, b"labels": labels.tolist()}
  return pickle.dumps(batch, protocol=protocol)


def write_cifar_dir(directory, binary, n=4, protocol=2):
  """Writes a small CIFAR-10 data set (n images per batch); returns arrays."""
  os.makedirs(directory, exist_ok=True)
  suffix = ".bin" if binary else ""
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
  batches = []
  for seed, name in enumerate(names):
    images, labels = random_images(n, (32, 32, 3), seed), random_labels(n, seed)
    data = (
        cifar_records(images, labels)
        if binary
        else cifar_pickle(images, labels, protocol)
    )
    write_file(os.path.join(directory, name + suffix), data)
    batches.append((images, labels))
  train = batches[:5]
  return (
      np.concatenate([b[0] for b in train]),
      np.concatenate([b[1] for b in train]),
      *batches[5],
  )


def assert_arrays_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


# ---------------------------------------------------------------------------
# IDX readers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
  images = random_images(7, (28, 28, 1))
  labels = random_labels(7)
  images_path = str(tmp_path / ("images" + suffix))
  labels_path = str(tmp_path / ("labels" + suffix))
  datasets.write_idx_images(images_path, images)
  datasets.write_idx_labels(labels_path, labels)
  read_images = datasets.read_idx_images(images_path)
  read_labels = datasets.read_idx_labels(labels_path)
  assert read_images.dtype == np.uint8 and read_labels.dtype == np.int64
  np.testing.assert_array_equal(read_images, images)
  np.testing.assert_array_equal(read_labels, labels)


def test_idx_writer_is_gzipped_and_standard(tmp_path):
  path = str(tmp_path / "labels.gz")
  datasets.write_idx_labels(path, np.array([3, 1, 4]))
  with gzip.open(path, "rb") as f:
    assert f.read() == idx_bytes(2049, [3], [3, 1, 4])


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_directory(tmp_path, suffix):
  expected = write_mnist_dir(str(tmp_path), suffix=suffix)
  assert_arrays_equal(datasets.load_mnist_directory(str(tmp_path)), expected)


def test_load_mnist_directory_prefers_uncompressed(tmp_path):
  write_mnist_dir(str(tmp_path), suffix=".gz")
  expected = write_mnist_dir(str(tmp_path), n_train=3, n_test=2, suffix="")
  assert_arrays_equal(datasets.load_mnist_directory(str(tmp_path)), expected)


def test_idx_wrong_magic(tmp_path):
  path = write_file(tmp_path / "x.gz", idx_bytes(2049, [1, 28, 28], [0] * 784))
  with pytest.raises(
      ValueError, match=r"x\.gz: bad IDX magic number 2049, expected 2051"
  ):
    datasets.read_idx_images(path)


def test_idx_wrong_image_dims(tmp_path):
  path = write_file(tmp_path / "x", idx_bytes(2051, [1, 28, 27], [0] * 756))
  with pytest.raises(ValueError, match=r"x: header says items of shape \(28, 27\)"):
    datasets.read_idx_images(path)


def test_idx_truncated(tmp_path):
  path = write_file(tmp_path / "x.gz", idx_bytes(2051, [2, 28, 28], [0] * 1000))
  with pytest.raises(
      ValueError, match=r"x\.gz: truncated file, header promises 2 items"
  ):
    datasets.read_idx_images(path)


def test_idx_truncated_header(tmp_path):
  path = write_file(tmp_path / "y", struct.pack(">I", 2049))
  with pytest.raises(ValueError, match=r"y: truncated IDX header"):
    datasets.read_idx_labels(path)


def test_idx_trailing_bytes(tmp_path):
  path = write_file(tmp_path / "y", idx_bytes(2049, [3], [1, 2, 3, 4, 5]))
  with pytest.raises(ValueError, match=r"y: 2 trailing bytes after the 3 items"):
    datasets.read_idx_labels(path)


def test_idx_bad_label(tmp_path):
  path = write_file(tmp_path / "y", idx_bytes(2049, [3], [1, 10, 3]))
  with pytest.raises(ValueError, match=r"y: label 10 at index 1 is outside 0\.\.9"):
    datasets.read_idx_labels(path)


def test_idx_truncated_gzip_stream(tmp_path):
  path = write_file(tmp_path / "y.gz", idx_bytes(2049, [3], [1, 2, 3]))
  data = open(path, "rb").read()
  write_file(tmp_path / "cut.bin", data[:-10])
  os.rename(tmp_path / "cut.bin", tmp_path / "cut.gz")
  with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
    datasets.read_idx_labels(str(tmp_path / "cut.gz"))


def test_idx_count_mismatch(tmp_path):
  write_mnist_dir(str(tmp_path))
  datasets.write_idx_labels(str(tmp_path / IDX_NAMES["test_labels"]), random_labels(4))
  with pytest.raises(
      ValueError,
      match=r"t10k-images-idx3-ubyte\.gz has 5 images but "
      r".*t10k-labels-idx1-ubyte has 4 labels",
  ):
    datasets.load_mnist_directory(str(tmp_path))


def test_idx_missing_file(tmp_path):
  write_mnist_dir(str(tmp_path))
  os.remove(tmp_path / (IDX_NAMES["train_labels"] + ".gz"))
  with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte\[\.gz\]"):
    datasets.load_mnist_directory(str(tmp_path))


def test_read_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothing-here\.gz"):
    datasets.read_idx_images(str(tmp_path / "nothing-here.gz"))


# ---------------------------------------------------------------------------
# CIFAR-10 readers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "binary,subdir",
    [
        (True, ""),
        (True, "cifar-10-batches-bin"),
        (False, ""),
        (False, "cifar-10-batches-py"),
    ],
)
def test_load_cifar10_directory(tmp_path, binary, subdir):
  expected = write_cifar_dir(str(tmp_path / subdir), binary)
  loaded = datasets.load_cifar10_directory(str(tmp_path))
  assert_arrays_equal(loaded, expected)
  assert loaded[0].shape == (20, 32, 32, 3) and loaded[2].shape == (4, 32, 32, 3)


def test_cifar10_binary_is_chw_on_disk(tmp_path):
  # Red channel all 1, green 2, blue 3: CHW on disk means 1024 ones first.
  record = bytes([7] + [1] * 1024 + [2] * 1024 + [3] * 1024)
  path = write_file(tmp_path / "b.bin", record)
  images, labels = datasets.read_cifar10_binary(path)
  np.testing.assert_array_equal(labels, [7])
  np.testing.assert_array_equal(images[0, 5, 9], [1, 2, 3])


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickle_protocols(tmp_path, protocol):
  images, labels = random_images(3, (32, 32, 3)), random_labels(3)
  path = write_file(tmp_path / "p", cifar_pickle(images, labels, protocol))
  assert_arrays_equal(datasets.read_cifar10_pickle(path), (images, labels))


def test_cifar10_binary_truncated(tmp_path):
  data = cifar_records(random_images(2, (32, 32, 3)), random_labels(2))
  path = write_file(tmp_path / "data_batch_1.bin", data[:-1])
  with pytest.raises(
      ValueError,
      match=r"data_batch_1\.bin: size 6145 bytes is not a "
      r"positive multiple of the 3073-byte",
  ):
    datasets.read_cifar10_binary(path)


def test_cifar10_binary_trailing_bytes(tmp_path):
  data = cifar_records(random_images(2, (32, 32, 3)), random_labels(2))
  path = write_file(tmp_path / "b.bin", data + b"\0")
  with pytest.raises(ValueError, match=r"b\.bin: size 6147 bytes"):
    datasets.read_cifar10_binary(path)


def test_cifar10_binary_empty(tmp_path):
  path = write_file(tmp_path / "b.bin", b"")
  with pytest.raises(ValueError, match=r"b\.bin: size 0 bytes"):
    datasets.read_cifar10_binary(path)


def test_cifar10_binary_bad_label(tmp_path):
  data = cifar_records(random_images(2, (32, 32, 3)), np.array([3, 12]))
  path = write_file(tmp_path / "b.bin", data)
  with pytest.raises(ValueError, match=r"b\.bin: label 12 at index 1"):
    datasets.read_cifar10_binary(path)


def test_cifar10_pickle_bad_label(tmp_path):
  path = write_file(
      tmp_path / "p", cifar_pickle(random_images(2, (32, 32, 3)), np.array([-1, 3]))
  )
  with pytest.raises(ValueError, match=r"p: label -1 at index 0"):
    datasets.read_cifar10_pickle(path)


def test_cifar10_pickle_count_mismatch(tmp_path):
  path = write_file(
      tmp_path / "p", cifar_pickle(random_images(3, (32, 32, 3)), random_labels(2))
  )
  with pytest.raises(ValueError, match=r"p has 3 images but .*p has 2 labels"):
    datasets.read_cifar10_pickle(path)


def test_cifar10_pickle_wrong_data_shape(tmp_path):
  batch = {b"data": np.zeros((2, 3000), np.uint8), b"labels": [1, 2]}
  path = write_file(tmp_path / "p", pickle.dumps(batch))
  with pytest.raises(
      ValueError, match=r"p: expected uint8 image data of shape \(N, 3072\)"
  ):
    datasets.read_cifar10_pickle(path)


def test_cifar10_pickle_missing_key(tmp_path):
  path = write_file(
      tmp_path / "p", pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)})
  )
  with pytest.raises(
      ValueError, match=r"p: expected a dict with keys b'data' and b'labels'"
  ):
    datasets.read_cifar10_pickle(path)


def test_cifar10_pickle_truncated(tmp_path):
  data = cifar_pickle(random_images(2, (32, 32, 3)), random_labels(2))
  path = write_file(tmp_path / "p", data[:-100])
  with pytest.raises(ValueError, match=r"p: not a valid CIFAR-10 pickle"):
    datasets.read_cifar10_pickle(path)


class _Exploit:

  def __reduce__(self):
    return (sys.exit, ("pickle executed code",))


def test_cifar10_pickle_refuses_arbitrary_objects(tmp_path):
  path = write_file(tmp_path / "p", pickle.dumps({b"data": _Exploit(), b"labels": []}))
  with pytest.raises(ValueError, match=r"refusing to load global sys\.exit"):
    datasets.read_cifar10_pickle(path)


def test_cifar10_missing_batch(tmp_path):
  write_cifar_dir(str(tmp_path), binary=True)
  os.remove(tmp_path / "data_batch_3.bin")
  with pytest.raises(FileNotFoundError, match=r"data_batch_3\.bin"):
    datasets.load_cifar10_directory(str(tmp_path))


def test_cifar10_empty_directory(tmp_path):
  with pytest.raises(
      FileNotFoundError, match=r"No CIFAR-10 batches .*cifar-10-batches-py"
  ):
    datasets.load_cifar10_directory(str(tmp_path))


# ---------------------------------------------------------------------------
# load_dataset and the embedded sample
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
  return datasets.load_dataset("mnist")


def test_embedded_sample_shapes_and_balance(embedded):
  x_train, y_train, x_test, y_test = embedded
  assert x_train.shape == (10000, 28, 28, 1) and x_test.shape == (2000, 28, 28, 1)
  assert x_train.dtype == x_test.dtype == np.uint8
  assert y_train.dtype == y_test.dtype == np.int64
  np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [1000] * 10)
  np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [200] * 10)


def test_embedded_sample_looks_like_mnist(embedded):
  x_train, _, x_test, _ = embedded
  for images in (x_train, x_test):
    assert images.min() == 0 and images.max() == 255
    assert 20 < images.mean() < 50  # MNIST: mostly black, mean about 33.
    assert (images.reshape(len(images), -1).max(axis=1) > 0).all()  # No blank image.
    # Digits are centred: the border is almost black, the centre is bright.
    border = np.concatenate(
        [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]]
    )
    assert border.mean() < 1 and images[:, 10:18, 10:18].mean() > 80
  # All images are distinct.
  assert len(np.unique(x_train.reshape(len(x_train), -1), axis=0)) == len(x_train)


def test_load_dataset_embedded_is_explicit_default(embedded):
  assert_arrays_equal(datasets.load_dataset("mnist", "embedded"), embedded)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_load_dataset_embedded_only_for_mnist(name):
  with pytest.raises(
      ValueError, match=rf"Only mnist has an embedded sample; for '{name}'"
  ):
    datasets.load_dataset(name)


def test_load_dataset_unknown_name():
  with pytest.raises(ValueError, match=r"Unknown data set 'svhn'"):
    datasets.load_dataset("svhn")


def test_load_dataset_unknown_source(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown data source .*nope"):
    datasets.load_dataset("mnist", str(tmp_path / "nope"))


def test_load_dataset_tfds_dir_needs_tfds(tmp_path):
  with pytest.raises(ValueError, match=r"need data_source='tfds'"):
    datasets.load_dataset("mnist", str(tmp_path), tfds_data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_dataset_idx_directory(tmp_path, name):
  expected = write_mnist_dir(str(tmp_path))
  assert_arrays_equal(datasets.load_dataset(name, str(tmp_path)), expected)


def test_load_dataset_cifar10_directory(tmp_path):
  expected = write_cifar_dir(str(tmp_path / "cifar-10-batches-py"), binary=False)
  assert_arrays_equal(datasets.load_dataset("cifar10", str(tmp_path)), expected)


def test_load_dataset_tfds(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []

  def fake_load(name, **kwargs):
    calls.append((name, kwargs))
    split = lambda n: (
        tf.zeros((n, 32, 32, 3), tf.uint8),
        tf.range(n, dtype=tf.int64) % 10,
    )
    return [split(n) for n in (6, 4)]

  monkeypatch.setattr(tfds, "load", fake_load)
  x_train, y_train, x_test, y_test = datasets.load_dataset(
      "cifar10", "tfds", tfds_data_dir="/some/dir"
  )
  assert calls == [
      (
          "cifar10",
          dict(
              split=["train", "test"],
              data_dir="/some/dir",
              download=False,
              as_supervised=True,
              batch_size=-1,
          ),
      )
  ]
  assert isinstance(x_train, np.ndarray) and x_train.shape == (6, 32, 32, 3)
  assert x_train.dtype == np.uint8 and y_test.dtype == np.int64
  np.testing.assert_array_equal(y_test, [0, 1, 2, 3])


def test_tfds_dataset_passes_arguments(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []
  monkeypatch.setattr(tfds, "load", lambda name, **kwargs: calls.append((name, kwargs)))
  datasets.tfds_dataset("imagenet2012", "validation", data_dir="/d")
  assert calls == [
      (
          "imagenet2012",
          dict(split="validation", data_dir="/d", download=False, as_supervised=True),
      )
  ]


def test_tfds_dataset_manual_dir(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []
  monkeypatch.setattr(tfds, "load", lambda name, **kwargs: calls.append((name, kwargs)))
  datasets.tfds_dataset("imagenet2012", "train", data_dir="/d", manual_dir="/m")
  [(name, kwargs)] = calls
  config = kwargs.pop("download_and_prepare_kwargs")["download_config"]
  assert config.manual_dir == "/m"
  assert (name, kwargs) == (
      "imagenet2012",
      dict(split="train", data_dir="/d", download=True, as_supervised=True),
  )


def test_tfds_without_data_fails_without_download(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(Exception, match=r"mnist"):  # TFDS raises AssertionError.
    datasets.load_dataset("mnist", "tfds", tfds_data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# Experiment options
# ---------------------------------------------------------------------------


def test_validation_split_disjoint_and_complete():
  x = np.arange(100) * 10
  y = np.arange(100)
  x_tr, y_tr, x_val, y_val = datasets.validation_split(x, y, 15, seed=3)
  assert len(x_val) == 15 and len(x_tr) == 85
  np.testing.assert_array_equal(x_tr, y_tr * 10)  # Pairs stay together.
  np.testing.assert_array_equal(x_val, y_val * 10)
  assert not set(y_tr) & set(y_val)
  assert sorted(np.concatenate([y_tr, y_val])) == list(range(100))
  assert_arrays_equal(
      datasets.validation_split(x, y, 15, seed=3), (x_tr, y_tr, x_val, y_val)
  )
  assert not np.array_equal(datasets.validation_split(x, y, 15, seed=4)[3], y_val)


@pytest.mark.parametrize("num_validation", [0, 100, -1])
def test_validation_split_bad_size(num_validation):
  with pytest.raises(ValueError, match=r"num_validation must be in 1\.\.99"):
    datasets.validation_split(np.zeros(100), np.zeros(100), num_validation, 0)


def test_noisy_labels_exact_count_and_changed():
  y = random_labels(999)
  noisy, corrupted = datasets.noisy_labels(y, 0.3, 10, seed=5)
  assert corrupted.dtype == bool and corrupted.sum() == 300  # round(299.7)
  assert (noisy[corrupted] != y[corrupted]).all()
  np.testing.assert_array_equal(noisy[~corrupted], y[~corrupted])
  assert noisy.dtype == np.int64 and noisy.min() >= 0 and noisy.max() <= 9
  np.testing.assert_array_equal(y, random_labels(999))  # Input unchanged.


def test_noisy_labels_seeding():
  y = random_labels(500)
  first = datasets.noisy_labels(y, 0.4, 10, seed=1)
  assert_arrays_equal(datasets.noisy_labels(y, 0.4, 10, seed=1), first)
  other = datasets.noisy_labels(y, 0.4, 10, seed=2)
  assert not np.array_equal(other[1], first[1])
  assert not np.array_equal(other[0], first[0])


def test_noisy_labels_uniform_over_other_classes():
  y = np.zeros(45000, dtype=np.int64)
  noisy, corrupted = datasets.noisy_labels(y, 1.0, 10, seed=0)
  assert corrupted.all()
  counts = np.bincount(noisy, minlength=10)
  assert counts[0] == 0
  assert (np.abs(counts[1:] - 5000) < 300).all()  # About 7 standard deviations.


def test_noisy_labels_zero_fraction():
  y = random_labels(50)
  noisy, corrupted = datasets.noisy_labels(y, 0.0, 10, seed=0)
  np.testing.assert_array_equal(noisy, y)
  assert not corrupted.any()


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_noisy_labels_bad_fraction(fraction):
  with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
    datasets.noisy_labels(random_labels(10), fraction, 10, seed=0)


def test_balanced_subset_68_examples():
  x = np.arange(1000) * 10
  y = random_labels(1000)
  x_sub, y_sub = datasets.balanced_subset(x, y, 68, 10, seed=0)
  counts = np.bincount(y_sub, minlength=10)
  assert len(y_sub) == 68 and set(counts) == {6, 7}
  assert (counts == 7).sum() == 8
  np.testing.assert_array_equal(y[x_sub // 10], y_sub)  # Pairs stay together.
  assert len(set(x_sub)) == 68
  assert_arrays_equal(datasets.balanced_subset(x, y, 68, 10, seed=0), (x_sub, y_sub))
  assert not np.array_equal(datasets.balanced_subset(x, y, 68, 10, seed=1)[0], x_sub)
  # Which classes get the extra example is random too.
  larger = {
      tuple(np.bincount(datasets.balanced_subset(x, y, 68, 10, seed)[1]) == 7)
      for seed in range(5)
  }
  assert len(larger) > 1


def test_balanced_subset_exact_multiple():
  y = random_labels(1000)
  _, y_sub = datasets.balanced_subset(np.zeros(1000), y, 500, 10, seed=0)
  np.testing.assert_array_equal(np.bincount(y_sub, minlength=10), [50] * 10)


def test_balanced_subset_too_few_in_class():
  y = np.array([0] * 10 + [1] * 2)
  with pytest.raises(ValueError, match=r"Class 1 has 2 examples, 3 needed"):
    datasets.balanced_subset(np.zeros(12), y, 6, 2, seed=0)


def test_balanced_subset_fewer_examples_than_classes():
  with pytest.raises(ValueError, match=r"num_examples must be in 10\.\.100"):
    datasets.balanced_subset(np.zeros(100), random_labels(100), 9, 10, seed=0)


# ---------------------------------------------------------------------------
# tf.data pipeline
# ---------------------------------------------------------------------------


def collect(dataset):
  batches = list(dataset.as_numpy_iterator())
  return [b[0] for b in batches], [b[1] for b in batches]


def test_make_tf_dataset_eval_keeps_order_and_scales():
  x, y = random_images(10, (28, 28, 1)), random_labels(10)
  images, labels = collect(datasets.make_tf_dataset(x, y, 4, training=False))
  assert [b.shape for b in images] == [(4, 28, 28, 1)] * 2 + [(2, 28, 28, 1)]
  assert all(b.dtype == np.float32 for b in images)
  assert labels[0].dtype == np.int64
  all_images = np.concatenate(images)
  assert all_images.min() >= 0.0 and all_images.max() <= 1.0
  np.testing.assert_allclose(all_images * 255, x, atol=1e-3)
  np.testing.assert_array_equal(np.concatenate(labels), y)


@pytest.mark.parametrize("cache", [True, False])
def test_make_tf_dataset_training_shuffles_reproducibly(cache):
  x = np.arange(64, dtype=np.uint8).reshape(64, 1, 1, 1)
  y = np.arange(64)
  dataset = datasets.make_tf_dataset(x, y, 16, training=True, seed=7, cache=cache)
  epoch1 = np.concatenate(collect(dataset)[1])
  epoch2 = np.concatenate(collect(dataset)[1])
  assert sorted(epoch1) == list(range(64))
  assert not np.array_equal(epoch1, np.arange(64))
  assert not np.array_equal(epoch1, epoch2)  # Reshuffled each epoch.
  images, labels = map(np.concatenate, collect(dataset))
  np.testing.assert_allclose(images[:, 0, 0, 0] * 255, labels, atol=1e-3)  # Pairs kept.
  again = datasets.make_tf_dataset(x, y, 16, training=True, seed=7, cache=cache)
  np.testing.assert_array_equal(np.concatenate(collect(again)[1]), epoch1)


def test_make_tf_dataset_repeat_before_batch_keeps_every_batch_full():
  """As the original's shuffle().repeat().batch(): 10 examples in batches of 4
  give full batches, one spanning two epochs, each epoch a permutation."""
  x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  dataset = datasets.make_tf_dataset(
      x, np.arange(10), 4, training=True, seed=3, repeat=True
  )
  labels = np.concatenate([b[1] for b in dataset.take(5).as_numpy_iterator()])
  assert labels.shape == (20,)
  assert sorted(labels[:10]) == list(range(10))
  assert sorted(labels[10:]) == list(range(10))
  assert not np.array_equal(labels[:10], labels[10:])  # reshuffled per epoch


def _crop_kind(augmented, original, pad=4):
  """Returns "plain" or "flipped" if `augmented` is a crop of zero-padded
  `original` (flipped left-right or not), else None."""
  padded = np.pad(original, [(pad, pad), (pad, pad), (0, 0)])
  height, width, _ = original.shape
  for top in range(2 * pad + 1):
    for left in range(2 * pad + 1):
      crop = padded[top : top + height, left : left + width]
      if np.array_equal(augmented, crop):
        return "plain"
      if np.array_equal(augmented, crop[:, ::-1]):
        return "flipped"
  return None


def test_make_tf_dataset_cifar_augmentation():
  x = random_images(32, (32, 32, 3))
  y = np.arange(32)
  dataset = datasets.make_tf_dataset(x, y, 8, training=True, augment="cifar", seed=1)
  images, labels = map(np.concatenate, collect(dataset))
  assert images.shape == (32, 32, 32, 3) and images.dtype == np.float32
  assert images.min() >= 0.0 and images.max() <= 1.0
  pixels = np.round(images * 255).astype(np.uint8)
  originals = x[labels]
  assert sum(not np.array_equal(p, o) for p, o in zip(pixels, originals)) >= 24
  kinds = [_crop_kind(p, o) for p, o in zip(pixels, originals)]
  assert None not in kinds
  assert 4 <= kinds.count("flipped") <= 28  # About half are flipped.
  # Fresh draws each epoch, reproducible for a given seed.
  epoch2 = np.concatenate(collect(dataset)[0])
  assert not np.array_equal(np.sort(epoch2, axis=None), np.sort(images, axis=None))
  again = datasets.make_tf_dataset(x, y, 8, training=True, augment="cifar", seed=1)
  np.testing.assert_array_equal(np.concatenate(collect(again)[0]), images)


def test_make_tf_dataset_unknown_augmentation():
  with pytest.raises(ValueError, match=r"Unknown augmentation 'mixup'"):
    datasets.make_tf_dataset(
        np.zeros((2, 32, 32, 3), np.uint8),
        np.zeros(2),
        2,
        training=True,
        augment="mixup",
    )


def test_make_tf_dataset_augmentation_needs_training():
  with pytest.raises(ValueError, match=r"only for training"):
    datasets.make_tf_dataset(
        np.zeros((2, 32, 32, 3), np.uint8),
        np.zeros(2),
        2,
        training=False,
        augment="cifar",
    )
