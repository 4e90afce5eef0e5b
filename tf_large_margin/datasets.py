"""Data sets for large-margin experiments: offline readers and experiment options.

Everything here works on plain numpy arrays: images are ``uint8`` arrays of shape
``(N, H, W, C)`` and labels are ``int64`` arrays of shape ``(N,)``.

* Readers for MNIST / Fashion-MNIST IDX files and CIFAR-10 (binary and python
  pickle versions). Every reader validates what it reads and raises a
  ``ValueError`` or ``FileNotFoundError`` naming the offending file instead of
  returning a partial data set.
* ``load_dataset`` picks a source: the embedded MNIST sample shipped with the
  package, TensorFlow Datasets, or a directory of the original files.
* Seeded experiment options: validation split, noisy labels, class-balanced
  subsets, and a ``tf.data`` input pipeline with optional CIFAR augmentation.
"""

import gzip
import io
import math
import os
import pickle
import struct
import zlib

import numpy as np
import tensorflow as tf

DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10")
NUM_CLASSES = 10

# Directory of the class-balanced MNIST sample shipped with the package
# (see data/README.md and scripts/make_mnist_sample.py).
EMBEDDED_MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

_IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension
_MNIST_IMAGE_SHAPE = (28, 28)

_CIFAR_IMAGE_SHAPE = (32, 32, 3)
_CIFAR_IMAGE_BYTES = 32 * 32 * 3
_CIFAR_RECORD_BYTES = 1 + _CIFAR_IMAGE_BYTES
_CIFAR_TRAIN_BATCHES = 5
_CIFAR_PADDING = 4


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


def _checked_labels(path, labels, num_classes=NUM_CLASSES):
  """Returns `labels` as int64 after checking they all lie in [0, num_classes)."""
  labels = np.asarray(labels, dtype=np.int64)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise ValueError(
        f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside "
        f"0..{num_classes - 1} ({bad.size} bad labels)"
    )
  return labels


def _check_same_count(images, labels, images_path, labels_path):
  """Raises ValueError unless there are as many images as labels."""
  if len(images) != len(labels):
    raise ValueError(
        f"{images_path} has {len(images)} images but {labels_path} has "
        f"{len(labels)} labels"
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
  return _checked_labels(path, labels, num_classes)


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
  _check_same_count(images, labels, images_path, labels_path)
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
  return _chw_to_hwc(path, records[:, 1:]), _checked_labels(path, records[:, 0])


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
  labels = _checked_labels(path, batch[b"labels"])
  _check_same_count(images, labels, path, path)
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


# ---------------------------------------------------------------------------
# Choosing a source
# ---------------------------------------------------------------------------


def tfds_dataset(name, split, data_dir=None, download=False, manual_dir=None):
  """Returns TFDS split `split` of `name` as a tf.data.Dataset of (image, label).

  Args:
    manual_dir: directory with manually downloaded archives (ImageNet's
      ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar for imagenet2012).
      If given, TFDS prepares the data set from them when it is not prepared
      yet in `data_dir` (without downloading anything else for imagenet2012).
  """
  import tensorflow_datasets as tfds  # Optional dependency; imported lazily.

  kwargs = {}
  if manual_dir is not None:
    kwargs = dict(
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
        }
    )
    download = True
  return tfds.load(
      name,
      split=split,
      data_dir=data_dir,
      download=download,
      as_supervised=True,
      **kwargs,
  )


def _load_tfds_numpy(name, data_dir, download):
  """Loads the train and test splits of TFDS data set `name` as numpy arrays."""
  import tensorflow_datasets as tfds  # Optional dependency; imported lazily.

  train, test = tfds.load(
      name,
      split=["train", "test"],
      data_dir=data_dir,
      download=download,
      as_supervised=True,
      batch_size=-1,
  )
  (x_train, y_train), (x_test, y_test) = tfds.as_numpy((train, test))
  return (
      x_train.astype(np.uint8),
      y_train.astype(np.int64),
      x_test.astype(np.uint8),
      y_test.astype(np.int64),
  )


_DIRECTORY_LOADERS = {
    "mnist": load_mnist_directory,
    "fashion_mnist": load_mnist_directory,
    "cifar10": load_cifar10_directory,
}


def load_dataset(name, data_source=None, tfds_data_dir=None, tfds_download=False):
  """Loads data set `name` ("mnist", "fashion_mnist" or "cifar10") as numpy.

  Args:
    name: data set name.
    data_source: None or "embedded" for the MNIST sample shipped with the
      package (mnist only); "tfds" for TensorFlow Datasets; otherwise a
      directory holding the original files.
    tfds_data_dir: TFDS data directory (only with data_source="tfds").
    tfds_download: whether TFDS may download missing data (default: no).

  Returns:
    (x_train, y_train, x_test, y_test): uint8 (N, H, W, C) images and int64
    (N,) labels.
  """
  if name not in DATASET_NAMES:
    raise ValueError(f"Unknown data set {name!r}; expected one of {DATASET_NAMES}")
  if data_source != "tfds" and (tfds_data_dir is not None or tfds_download):
    raise ValueError("tfds_data_dir / tfds_download need data_source='tfds'")
  if data_source in (None, "embedded"):
    if name != "mnist":
      raise ValueError(
          f"Only mnist has an embedded sample; for {name!r} pass "
          "data_source='tfds' or a directory with the data set files"
      )
    return load_embedded_mnist()
  if data_source == "tfds":
    return _load_tfds_numpy(name, tfds_data_dir, tfds_download)
  if not os.path.isdir(data_source):
    raise ValueError(
        f"Unknown data source {data_source!r}: expected 'embedded', 'tfds' "
        "or an existing directory"
    )
  return _DIRECTORY_LOADERS[name](data_source)


# ---------------------------------------------------------------------------
# Experiment options (all seeded)
# ---------------------------------------------------------------------------


def _check_same_length(x, y):
  """Raises ValueError unless x and y have the same number of examples."""
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} examples but y has {len(y)}")


def validation_split(x, y, num_validation, seed):
  """Randomly holds out `num_validation` examples.

  Returns:
    (x_train, y_train, x_val, y_val); the two parts are disjoint and together
    hold every example exactly once.
  """
  _check_same_length(x, y)
  if not 0 < num_validation < len(x):
    raise ValueError(f"num_validation must be in 1..{len(x) - 1}, got {num_validation}")
  order = np.random.default_rng(seed).permutation(len(x))
  val, train = order[:num_validation], order[num_validation:]
  return x[train], y[train], x[val], y[val]


def noisy_labels(y, fraction, num_classes, seed):
  """Replaces exactly round(fraction * N) labels by a different random class.

  Each corrupted label is drawn uniformly from the other num_classes - 1
  classes. Python's round() is used (ties to even).

  Returns:
    (noisy_y, corrupted): int64 labels and a boolean mask of changed indices.
  """
  if not 0 <= fraction <= 1:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2, got {num_classes}")
  y = _checked_labels("labels", y, num_classes)
  rng = np.random.default_rng(seed)
  corrupted = np.zeros(len(y), dtype=bool)
  corrupted[rng.choice(len(y), size=round(fraction * len(y)), replace=False)] = True
  offsets = rng.integers(1, num_classes, size=int(corrupted.sum()))
  noisy_y = y.copy()
  noisy_y[corrupted] = (y[corrupted] + offsets) % num_classes
  return noisy_y, corrupted


def balanced_subset(x, y, num_examples, num_classes, seed):
  """Draws a class-balanced random subset of `num_examples` examples.

  Every class gets num_examples // num_classes examples and a random choice of
  num_examples % num_classes classes gets one more, so class counts differ by
  at most one. The subset keeps the original order of the examples.
  """
  _check_same_length(x, y)
  if not num_classes <= num_examples <= len(y):
    raise ValueError(
        f"num_examples must be in {num_classes}..{len(y)} "
        f"(at least one per class), got {num_examples}"
    )
  y = _checked_labels("labels", y, num_classes)
  rng = np.random.default_rng(seed)
  per_class = np.full(num_classes, num_examples // num_classes)
  per_class[rng.choice(num_classes, num_examples % num_classes, replace=False)] += 1
  chosen = []
  for label, count in enumerate(per_class):
    candidates = np.flatnonzero(y == label)
    if len(candidates) < count:
      raise ValueError(f"Class {label} has {len(candidates)} examples, {count} needed")
    chosen.append(rng.choice(candidates, size=count, replace=False))
  indices = np.sort(np.concatenate(chosen))
  return x[indices], y[indices]


def _scale_image(image, label):
  """Converts a uint8 image to float32 in [0, 1]."""
  return tf.cast(image, tf.float32) / 255.0, label


def _cifar_augment(example, random_value):
  """Zero-pads by 4, randomly crops back and randomly flips left-right.

  Uses stateless ops seeded by `random_value` (from tf.data.Dataset.random).
  """
  image, label = example
  height, width, channels = image.shape
  padded = tf.pad(image, [[_CIFAR_PADDING, _CIFAR_PADDING]] * 2 + [[0, 0]])
  crop_seed = tf.stack([random_value, 0])
  flip_seed = tf.stack([random_value, 1])
  image = tf.image.stateless_random_crop(padded, [height, width, channels], crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed), label


_AUGMENTATIONS = {"cifar": _cifar_augment}


def make_tf_dataset(
    x, y, batch_size, training, augment=None, seed=None, cache=True, repeat=False
):
  """Builds a batched tf.data pipeline of float32 [0, 1] images and int64 labels.

  Args:
    x: uint8 images (N, H, W, C).
    y: integer labels (N,).
    batch_size: examples per batch (without ``repeat`` the last batch may be
      smaller).
    training: shuffle (seeded, reshuffled each epoch) and augment if True;
      otherwise keep the order.
    augment: None, or "cifar" for zero padding by 4 pixels, a random crop
      back to the original size and a random horizontal flip, drawn
      independently per example and epoch (training only).
    seed: seed for shuffling and augmentation (None: not reproducible).
    cache: keep the scaled float32 examples in memory after the first epoch
      (4 bytes per pixel) instead of converting them again every epoch.
    repeat: repeat the examples forever *before* batching, as the original
      code's ``shuffle().repeat().batch()``: every batch is full and a batch may
      span two epochs (each epoch reshuffled when ``training``).

  Returns:
    A tf.data.Dataset of (images, labels) batches.
  """
  _check_same_length(x, y)
  if augment is not None and augment not in _AUGMENTATIONS:
    raise ValueError(
        f"Unknown augmentation {augment!r}; expected one of {list(_AUGMENTATIONS)}"
    )
  if augment is not None and not training:
    raise ValueError("Augmentation is only for training data sets")
  dataset = tf.data.Dataset.from_tensor_slices((x, np.asarray(y, dtype=np.int64)))
  dataset = dataset.map(_scale_image, num_parallel_calls=tf.data.AUTOTUNE)
  if cache:
    dataset = dataset.cache()
  if training:
    dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
  if repeat:
    dataset = dataset.repeat()
  if augment is not None:
    randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip(dataset, randoms).map(
        _AUGMENTATIONS[augment], num_parallel_calls=tf.data.AUTOTUNE
    )
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
