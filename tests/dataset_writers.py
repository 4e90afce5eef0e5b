"""Small data set files for the data set tests: IDX, CIFAR-10 binary and pickle."""

import gzip
import os
import pickle
import struct

import numpy as np

from tf_large_margin import datasets

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


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
