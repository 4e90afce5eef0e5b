"""Tests for tf_large_margin.dataset_files: the IDX and CIFAR-10 readers and
writers, and check_labels (offline: all files are written here)."""

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest

from tf_large_margin import dataset_files as files
from dataset_writers import IDX_NAMES
from dataset_writers import assert_arrays_equal
from dataset_writers import cifar_pickle
from dataset_writers import cifar_records
from dataset_writers import idx_bytes
from dataset_writers import random_images
from dataset_writers import random_labels
from dataset_writers import write_cifar_dir
from dataset_writers import write_file
from dataset_writers import write_mnist_dir


# ---------------------------------------------------------------------------
# IDX readers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
  images = random_images(7, (28, 28, 1))
  labels = random_labels(7)
  images_path = str(tmp_path / ("images" + suffix))
  labels_path = str(tmp_path / ("labels" + suffix))
  files.write_idx_images(images_path, images)
  files.write_idx_labels(labels_path, labels)
  read_images = files.read_idx_images(images_path)
  read_labels = files.read_idx_labels(labels_path)
  assert read_images.dtype == np.uint8 and read_labels.dtype == np.int64
  np.testing.assert_array_equal(read_images, images)
  np.testing.assert_array_equal(read_labels, labels)


def test_idx_writer_is_gzipped_and_standard(tmp_path):
  path = str(tmp_path / "labels.gz")
  files.write_idx_labels(path, np.array([3, 1, 4]))
  with gzip.open(path, "rb") as f:
    assert f.read() == idx_bytes(2049, [3], [3, 1, 4])


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_directory(tmp_path, suffix):
  expected = write_mnist_dir(str(tmp_path), suffix=suffix)
  assert_arrays_equal(files.load_mnist_directory(str(tmp_path)), expected)


def test_load_mnist_directory_prefers_uncompressed(tmp_path):
  write_mnist_dir(str(tmp_path), suffix=".gz")
  expected = write_mnist_dir(str(tmp_path), n_train=3, n_test=2, suffix="")
  assert_arrays_equal(files.load_mnist_directory(str(tmp_path)), expected)


def test_idx_wrong_magic(tmp_path):
  path = write_file(tmp_path / "x.gz", idx_bytes(2049, [1, 28, 28], [0] * 784))
  with pytest.raises(
      ValueError, match=r"x\.gz: bad IDX magic number 2049, expected 2051"
  ):
    files.read_idx_images(path)


def test_idx_wrong_image_dims(tmp_path):
  path = write_file(tmp_path / "x", idx_bytes(2051, [1, 28, 27], [0] * 756))
  with pytest.raises(ValueError, match=r"x: header says items of shape \(28, 27\)"):
    files.read_idx_images(path)


def test_idx_truncated(tmp_path):
  path = write_file(tmp_path / "x.gz", idx_bytes(2051, [2, 28, 28], [0] * 1000))
  with pytest.raises(
      ValueError, match=r"x\.gz: truncated file, header promises 2 items"
  ):
    files.read_idx_images(path)


def test_idx_truncated_header(tmp_path):
  path = write_file(tmp_path / "y", struct.pack(">I", 2049))
  with pytest.raises(ValueError, match=r"y: truncated IDX header"):
    files.read_idx_labels(path)


def test_idx_trailing_bytes(tmp_path):
  path = write_file(tmp_path / "y", idx_bytes(2049, [3], [1, 2, 3, 4, 5]))
  with pytest.raises(ValueError, match=r"y: 2 trailing bytes after the 3 items"):
    files.read_idx_labels(path)


def test_idx_bad_label(tmp_path):
  path = write_file(tmp_path / "y", idx_bytes(2049, [3], [1, 10, 3]))
  with pytest.raises(ValueError, match=r"y: label 10 at index 1 is outside 0\.\.9"):
    files.read_idx_labels(path)


def test_idx_truncated_gzip_stream(tmp_path):
  path = write_file(tmp_path / "y.gz", idx_bytes(2049, [3], [1, 2, 3]))
  data = open(path, "rb").read()
  write_file(tmp_path / "cut.bin", data[:-10])
  os.rename(tmp_path / "cut.bin", tmp_path / "cut.gz")
  with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
    files.read_idx_labels(str(tmp_path / "cut.gz"))


def test_idx_count_mismatch(tmp_path):
  write_mnist_dir(str(tmp_path))
  files.write_idx_labels(str(tmp_path / IDX_NAMES["test_labels"]), random_labels(4))
  with pytest.raises(
      ValueError,
      match=r"t10k-images-idx3-ubyte\.gz has 5 images but "
      r".*t10k-labels-idx1-ubyte has 4 labels",
  ):
    files.load_mnist_directory(str(tmp_path))


def test_idx_missing_file(tmp_path):
  write_mnist_dir(str(tmp_path))
  os.remove(tmp_path / (IDX_NAMES["train_labels"] + ".gz"))
  with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte\[\.gz\]"):
    files.load_mnist_directory(str(tmp_path))


def test_read_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothing-here\.gz"):
    files.read_idx_images(str(tmp_path / "nothing-here.gz"))


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
  loaded = files.load_cifar10_directory(str(tmp_path))
  assert_arrays_equal(loaded, expected)
  assert loaded[0].shape == (20, 32, 32, 3) and loaded[2].shape == (4, 32, 32, 3)


def test_cifar10_binary_is_chw_on_disk(tmp_path):
  # Red channel all 1, green 2, blue 3: CHW on disk means 1024 ones first.
  record = bytes([7] + [1] * 1024 + [2] * 1024 + [3] * 1024)
  path = write_file(tmp_path / "b.bin", record)
  images, labels = files.read_cifar10_binary(path)
  np.testing.assert_array_equal(labels, [7])
  np.testing.assert_array_equal(images[0, 5, 9], [1, 2, 3])


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickle_protocols(tmp_path, protocol):
  images, labels = random_images(3, (32, 32, 3)), random_labels(3)
  path = write_file(tmp_path / "p", cifar_pickle(images, labels, protocol))
  assert_arrays_equal(files.read_cifar10_pickle(path), (images, labels))


def test_cifar10_binary_truncated(tmp_path):
  data = cifar_records(random_images(2, (32, 32, 3)), random_labels(2))
  path = write_file(tmp_path / "data_batch_1.bin", data[:-1])
  with pytest.raises(
      ValueError,
      match=r"data_batch_1\.bin: size 6145 bytes is not a "
      r"positive multiple of the 3073-byte",
  ):
    files.read_cifar10_binary(path)


def test_cifar10_binary_trailing_bytes(tmp_path):
  data = cifar_records(random_images(2, (32, 32, 3)), random_labels(2))
  path = write_file(tmp_path / "b.bin", data + b"\0")
  with pytest.raises(ValueError, match=r"b\.bin: size 6147 bytes"):
    files.read_cifar10_binary(path)


def test_cifar10_binary_empty(tmp_path):
  path = write_file(tmp_path / "b.bin", b"")
  with pytest.raises(ValueError, match=r"b\.bin: size 0 bytes"):
    files.read_cifar10_binary(path)


def test_cifar10_binary_bad_label(tmp_path):
  data = cifar_records(random_images(2, (32, 32, 3)), np.array([3, 12]))
  path = write_file(tmp_path / "b.bin", data)
  with pytest.raises(ValueError, match=r"b\.bin: label 12 at index 1"):
    files.read_cifar10_binary(path)


def test_cifar10_pickle_bad_label(tmp_path):
  path = write_file(
      tmp_path / "p", cifar_pickle(random_images(2, (32, 32, 3)), np.array([-1, 3]))
  )
  with pytest.raises(ValueError, match=r"p: label -1 at index 0"):
    files.read_cifar10_pickle(path)


def test_cifar10_pickle_count_mismatch(tmp_path):
  path = write_file(
      tmp_path / "p", cifar_pickle(random_images(3, (32, 32, 3)), random_labels(2))
  )
  with pytest.raises(ValueError, match=r"p has 3 images but .*p has 2 labels"):
    files.read_cifar10_pickle(path)


def test_cifar10_pickle_wrong_data_shape(tmp_path):
  batch = {b"data": np.zeros((2, 3000), np.uint8), b"labels": [1, 2]}
  path = write_file(tmp_path / "p", pickle.dumps(batch))
  with pytest.raises(
      ValueError, match=r"p: expected uint8 image data of shape \(N, 3072\)"
  ):
    files.read_cifar10_pickle(path)


def test_cifar10_pickle_missing_key(tmp_path):
  path = write_file(
      tmp_path / "p", pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)})
  )
  with pytest.raises(
      ValueError, match=r"p: expected a dict with keys b'data' and b'labels'"
  ):
    files.read_cifar10_pickle(path)


def test_cifar10_pickle_truncated(tmp_path):
  data = cifar_pickle(random_images(2, (32, 32, 3)), random_labels(2))
  path = write_file(tmp_path / "p", data[:-100])
  with pytest.raises(ValueError, match=r"p: not a valid CIFAR-10 pickle"):
    files.read_cifar10_pickle(path)


class _Exploit:

  def __reduce__(self):
    return (sys.exit, ("pickle executed code",))


def test_cifar10_pickle_refuses_arbitrary_objects(tmp_path):
  path = write_file(tmp_path / "p", pickle.dumps({b"data": _Exploit(), b"labels": []}))
  with pytest.raises(ValueError, match=r"refusing to load global sys\.exit"):
    files.read_cifar10_pickle(path)


def test_cifar10_missing_batch(tmp_path):
  write_cifar_dir(str(tmp_path), binary=True)
  os.remove(tmp_path / "data_batch_3.bin")
  with pytest.raises(FileNotFoundError, match=r"data_batch_3\.bin"):
    files.load_cifar10_directory(str(tmp_path))


def test_cifar10_empty_directory(tmp_path):
  with pytest.raises(
      FileNotFoundError, match=r"No CIFAR-10 batches .*cifar-10-batches-py"
  ):
    files.load_cifar10_directory(str(tmp_path))


# ---------------------------------------------------------------------------
# check_labels
# ---------------------------------------------------------------------------


def test_check_labels_returns_int64_of_the_same_shape():
  for labels in ([3, 0, 9], np.array([[3], [0], [9]], np.uint8), [3.0, 0.0, 9.0]):
    checked = files.check_labels(labels, 10)
    assert checked.dtype == np.int64
    assert checked.shape == np.shape(labels)
    np.testing.assert_array_equal(checked.ravel(), [3, 0, 9])


BAD_LABELS = [
    ([0, 3, 10, 11], r"label 10 at index 2 is outside 0\.\.9 \(2 bad labels\)"),
    ([[0], [-1]], r"label -1 at index 1 is outside 0\.\.9"),
    ([0.0, 2.5], r"label 2\.5 at index 1 is not an integer"),
    ([0.0, np.nan], r"label nan at index 1 is not an integer"),
    (np.zeros((2, 3)), r"expected class ids of shape \(N,\) or \(N, 1\), got shape"),
    ([True, False], r"expected integer class ids, got dtype bool"),
    (["1"], r"expected integer class ids, got dtype <U1"),
]


@pytest.mark.parametrize("labels,message", BAD_LABELS)
def test_check_labels_names_the_bad_label_and_its_index(labels, message):
  with pytest.raises(ValueError, match="training labels: " + message):
    files.check_labels(labels, 10, "training labels")


def test_check_labels_without_num_classes_checks_only_the_sign():
  np.testing.assert_array_equal(files.check_labels([0, 1000]), [0, 1000])
  with pytest.raises(ValueError, match=r"labels: label -3 at index 0 is outside >= 0"):
    files.check_labels([-3, 1])


@pytest.mark.parametrize("num_classes", [0, -2, 2.0, True])
def test_check_labels_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match=r"num_classes must be a positive integer"):
    files.check_labels([0], num_classes)
