"""Data set files: MNIST / Fashion-MNIST IDX and CIFAR-10, read and validated.

Images are ``uint8`` arrays of shape ``(N, H, W, C)`` and labels ``int64`` arrays
of shape ``(N,)``. Every reader validates what it reads and raises a
``ValueError`` or ``FileNotFoundError`` naming the offending file (and, for a bad
label, its value and index) instead of returning a partial data set.
``check_labels`` is the label check the readers, `tf_large_margin.datasets` and
the example scripts share. Users normally call these through
`tf_large_margin.datasets` (``load_dataset``, ``load_embedded_mnist``, ...).
"""

import gzip
import io
import math
import numbers
import os
import pickle
import struct
import zlib

import numpy as np

NUM_CLASSES = 10

# Directory of the class-balanced MNIST sample shipped with the package
# (see data/README.md and scripts/make_mnist_sample.py).
EMBEDDED_MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

_IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension
_MNIST_IMAGE_SHAPE = (28, 28)

_CIFAR_IMAGE_BYTES = 32 * 32 * 3
_CIFAR_RECORD_BYTES = 1 + _CIFAR_IMAGE_BYTES
_CIFAR_TRAIN_BATCHES = 5


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def check_labels(labels, num_classes=None, source="labels"):
  """Returns ``labels`` as int64 after checking each is a class id.

  Checks where the data enter (readers, `tf_large_margin.datasets`, the example
  scripts), so a bad label is reported by value and index instead of surfacing
  inside ``fit`` as a graph error that prints other labels.

  Args:
    labels: class ids of shape (N,) or (N, 1): integers, or floats with integer
      values.
    num_classes: labels must lie in [0, num_classes); None: only >= 0.
    source: what the labels are (a file name, "training labels", ...), the
      start of the error message.

  Returns:
    The labels as an int64 array of the same shape.

  Raises:
    ValueError: naming ``source``, the first offending label, its index (the
      example's index) and the number of bad labels.
  """
  if num_classes is not None and (
      isinstance(num_classes, bool)
      or not isinstance(num_classes, numbers.Integral)
      or num_classes < 1
  ):
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    flat = labels[:, 0]
  elif labels.ndim == 1:
    flat = labels
  else:
    raise ValueError(
        f"{source}: expected class ids of shape (N,) or (N, 1), got shape "
        f"{labels.shape}"
    )
  if flat.dtype == bool or not (
      np.issubdtype(flat.dtype, np.integer) or np.issubdtype(flat.dtype, np.floating)
  ):
    raise ValueError(f"{source}: expected integer class ids, got dtype {flat.dtype}")
  if np.issubdtype(flat.dtype, np.floating):
    with np.errstate(invalid="ignore"):
      bad = np.flatnonzero(~np.isfinite(flat) | (flat != np.round(flat)))
    if bad.size:
      raise ValueError(
          f"{source}: label {flat[bad[0]]} at index {bad[0]} is not an integer "
          f"class id ({bad.size} bad labels)"
      )
  upper = np.inf if num_classes is None else num_classes
  bad = np.flatnonzero((flat < 0) | (flat >= upper))
  if bad.size:
    allowed = ">= 0" if num_classes is None else f"0..{num_classes - 1}"
    raise ValueError(
        f"{source}: label {flat[bad[0]].item()} at index {bad[0]} is outside "
        f"{allowed} ({bad.size} bad labels)"
    )
  return labels.astype(np.int64)


def check_same_count(images, labels, images_source="x", labels_source="y"):
  """Raises ValueError unless there are as many images as labels."""
  if len(images) != len(labels):
    raise ValueError(
        f"{images_source} has {len(images)} images but {labels_source} has "
        f"{len(labels)} labels"
    )


# ---------------------------------------------------------------------------
# Low-level file access
# ---------------------------------------------------------------------------


def _read_bytes(path):
  """Returns the whole (gunzipped if the name ends in .gz) content of `path`."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"Data file not found: {path}") from None
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e


def _find_file(directory, basename):
  """Returns the path of `basename` or `basename`.gz in `directory`.

  The uncompressed file is preferred when both exist.
  """
  for name in (basename, basename + ".gz"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"Data file not found: {os.path.join(directory, basename)}[.gz]"
  )


# ---------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files
# ---------------------------------------------------------------------------


def _parse_idx(path, data, magic, item_shape):
  """Parses IDX bytes whose items must have shape `item_shape`; returns uint8."""
  header_size = 4 * (2 + len(item_shape))
  if len(data) < header_size:
    raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
  found_magic, count, *dims = struct.unpack(f">{header_size // 4}I", data[:header_size])
  if found_magic != magic:
    raise ValueError(f"{path}: bad IDX magic number {found_magic}, expected {magic}")
  if tuple(dims) != tuple(item_shape):
    raise ValueError(
        f"{path}: header says items of shape {tuple(dims)}, "
        f"expected {tuple(item_shape)}"
    )
  expected_size = header_size + count * math.prod(item_shape)
  if len(data) < expected_size:
    raise ValueError(
        f"{path}: truncated file, header promises {count} items "
        f"({expected_size} bytes) but the file has {len(data)} bytes"
    )
  if len(data) > expected_size:
    raise ValueError(
        f"{path}: {len(data) - expected_size} trailing bytes after the "
        f"{count} items the header promises"
    )
  items = np.frombuffer(data, dtype=np.uint8, offset=header_size)
  return items.reshape((count, *item_shape))


def read_idx_images(path, image_shape=_MNIST_IMAGE_SHAPE):
  """Reads an IDX image file (optionally gzipped) into uint8 (N, H, W, 1)."""
  images = _parse_idx(path, _read_bytes(path), _IDX_IMAGES_MAGIC, image_shape)
  return images[..., np.newaxis].copy()


def read_idx_labels(path, num_classes=NUM_CLASSES):
  """Reads an IDX label file (optionally gzipped) into int64 (N,)."""
  labels = _parse_idx(path, _read_bytes(path), _IDX_LABELS_MAGIC, ())
  return check_labels(labels, num_classes, path)


def _write_bytes(path, data):
  """Writes `data` to `path`, gzipped (reproducibly: no name/time) if .gz."""
  with open(path, "wb") as f:
    if path.endswith(".gz"):
      with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(data)
    else:
      f.write(data)


def write_idx_images(path, images):
  """Writes uint8 images (N, H, W) or (N, H, W, 1) as an IDX file (.gz: gzipped)."""
  images = np.asarray(images)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(
        f"Expected uint8 images (N, H, W[, 1]), got {images.dtype} {images.shape}"
    )
  header = struct.pack(">4I", _IDX_IMAGES_MAGIC, *images.shape)
  _write_bytes(path, header + images.tobytes())


def write_idx_labels(path, labels):
  """Writes integer labels in 0..255 (N,) as an IDX file (.gz: gzipped)."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"Expected 1-D labels, got shape {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError("IDX labels must lie in 0..255")
  header = struct.pack(">2I", _IDX_LABELS_MAGIC, len(labels))
  _write_bytes(path, header + labels.astype(np.uint8).tobytes())


def _load_idx_split(directory, prefix):
  """Loads `prefix`-images/labels (prefix "train" or "t10k") from `directory`."""
  images_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
  labels_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
  images = read_idx_images(images_path)
  labels = read_idx_labels(labels_path)
  check_same_count(images, labels, images_path, labels_path)
  return images, labels


def load_mnist_directory(directory):
  """Loads MNIST or Fashion-MNIST from the four IDX files in `directory`.

  Files may be gzipped (`.gz`) or not; the uncompressed one wins if both exist.

  Returns:
    (x_train, y_train, x_test, y_test): uint8 (N, 28, 28, 1) images and int64
    labels.
  """
  x_train, y_train = _load_idx_split(directory, "train")
  x_test, y_test = _load_idx_split(directory, "t10k")
  return x_train, y_train, x_test, y_test


def load_embedded_mnist():
  """Loads the class-balanced MNIST sample shipped with the package.

  10,000 training images (1,000 per class) and 2,000 test images (200 per
  class); see data/README.md.
  """
  return load_mnist_directory(EMBEDDED_MNIST_DIR)


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


def _chw_to_hwc(path, flat_images):
  """Converts uint8 rows of 3072 CHW bytes to (N, 32, 32, 3) HWC images."""
  flat_images = np.asarray(flat_images)
  if (
      flat_images.dtype != np.uint8
      or flat_images.ndim != 2
      or flat_images.shape[1] != _CIFAR_IMAGE_BYTES
  ):
    raise ValueError(
        f"{path}: expected uint8 image data of shape (N, {_CIFAR_IMAGE_BYTES}), "
        f"got {flat_images.dtype} {flat_images.shape}"
    )
  chw = flat_images.reshape(-1, 3, 32, 32)
  return np.ascontiguousarray(chw.transpose(0, 2, 3, 1))


def read_cifar10_binary(path):
  """Reads one CIFAR-10 binary batch (records of 1 label byte + 3072 CHW bytes).

  Returns:
    (images, labels): uint8 (N, 32, 32, 3) HWC images and int64 labels.
  """
  data = _read_bytes(path)
  if not data or len(data) % _CIFAR_RECORD_BYTES:
    raise ValueError(
        f"{path}: size {len(data)} bytes is not a positive multiple of the "
        f"{_CIFAR_RECORD_BYTES}-byte record size (truncated or trailing bytes)"
    )
  records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD_BYTES)
  labels = check_labels(records[:, 0], NUM_CLASSES, path)
  return _chw_to_hwc(path, records[:, 1:]), labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that only reconstructs numpy arrays, never arbitrary objects."""

  _ALLOWED = frozenset(
      [
          ("numpy.core.multiarray", "_reconstruct"),
          ("numpy._core.multiarray", "_reconstruct"),
          ("numpy.core.numeric", "_frombuffer"),
          ("numpy._core.numeric", "_frombuffer"),
          ("numpy", "ndarray"),
          ("numpy", "dtype"),
          ("_codecs", "encode"),
      ]
  )

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
    return super().find_class(module, name)


def read_cifar10_pickle(path):
  """Reads one CIFAR-10 python batch (pickled dict with b"data", b"labels").

  Only numpy arrays are unpickled, so a malicious file cannot run code.

  Returns:
    (images, labels): uint8 (N, 32, 32, 3) HWC images and int64 labels.
  """
  data = _read_bytes(path)
  try:
    batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a valid CIFAR-10 pickle ({e})") from e
  if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
    raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'")
  images = _chw_to_hwc(path, batch[b"data"])
  labels = check_labels(batch[b"labels"], NUM_CLASSES, path)
  check_same_count(images, labels, path, path)
  return images, labels


def _cifar10_layout(directory):
  """Returns (batch directory, file suffix, reader) for a CIFAR-10 directory."""
  for subdir in ("", "cifar-10-batches-bin", "cifar-10-batches-py"):
    batch_dir = os.path.join(directory, subdir)
    if os.path.isfile(os.path.join(batch_dir, "data_batch_1.bin")):
      return batch_dir, ".bin", read_cifar10_binary
    if os.path.isfile(os.path.join(batch_dir, "data_batch_1")):
      return batch_dir, "", read_cifar10_pickle
  raise FileNotFoundError(
      f"No CIFAR-10 batches (data_batch_1.bin or data_batch_1) in {directory} "
      "or its cifar-10-batches-bin / cifar-10-batches-py subdirectory"
  )


def load_cifar10_directory(directory):
  """Loads CIFAR-10 (binary or python version) from `directory`.

  `directory` may hold the batch files itself or contain the extracted
  `cifar-10-batches-bin` or `cifar-10-batches-py` directory (binary preferred).

  Returns:
    (x_train, y_train, x_test, y_test): uint8 (N, 32, 32, 3) images and int64
    labels.
  """
  batch_dir, suffix, reader = _cifar10_layout(directory)
  train = [
      reader(os.path.join(batch_dir, f"data_batch_{i}{suffix}"))
      for i in range(1, _CIFAR_TRAIN_BATCHES + 1)
  ]
  x_test, y_test = reader(os.path.join(batch_dir, f"test_batch{suffix}"))
  x_train = np.concatenate([images for images, _ in train])
  y_train = np.concatenate([labels for _, labels in train])
  return x_train, y_train, x_test, y_test
