"""Data sets for large-margin experiments: the entry point.

Everything here works on plain numpy arrays: images are ``uint8`` arrays of shape
``(N, H, W, C)`` and labels are ``int64`` arrays of shape ``(N,)``.

* ``load_dataset`` picks a source: the embedded MNIST sample shipped with the
  package (``load_embedded_mnist``), TensorFlow Datasets, or a directory of the
  original files (MNIST / Fashion-MNIST IDX or CIFAR-10; the readers and writers
  are in `tf_large_margin.dataset_files` and re-exported here).
* ``check_labels`` checks class ids where the data enter and names the first bad
  label and its index (the loaders and ``make_tf_dataset`` use it).
* Seeded experiment options: validation split, noisy labels, class-balanced
  subsets, and a ``tf.data`` input pipeline with optional CIFAR augmentation;
  its endless (``repeat=True``) training stream is a function of the seed and
  the step, so a resumed run (``start_step``) sees the batches an uninterrupted
  run would.
"""

import os

import numpy as np
import tensorflow as tf

from tf_large_margin import dataset_files
# Re-exported: `tf_large_margin.datasets` is the module users call.
from tf_large_margin.dataset_files import EMBEDDED_MNIST_DIR
from tf_large_margin.dataset_files import NUM_CLASSES
from tf_large_margin.dataset_files import check_labels
from tf_large_margin.dataset_files import check_same_count
from tf_large_margin.dataset_files import load_cifar10_directory
from tf_large_margin.dataset_files import load_embedded_mnist
from tf_large_margin.dataset_files import load_mnist_directory
from tf_large_margin.dataset_files import read_cifar10_binary
from tf_large_margin.dataset_files import read_cifar10_pickle
from tf_large_margin.dataset_files import read_idx_images
from tf_large_margin.dataset_files import read_idx_labels
from tf_large_margin.dataset_files import write_idx_images
from tf_large_margin.dataset_files import write_idx_labels

DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10")

__all__ = [
    "DATASET_NAMES",
    "EMBEDDED_MNIST_DIR",
    "NUM_CLASSES",
    "balanced_subset",
    "check_labels",
    "check_same_count",
    "load_cifar10_directory",
    "load_dataset",
    "load_embedded_mnist",
    "load_mnist_directory",
    "make_tf_dataset",
    "noisy_labels",
    "read_cifar10_binary",
    "read_cifar10_pickle",
    "read_idx_images",
    "read_idx_labels",
    "tfds_dataset",
    "validation_split",
    "write_idx_images",
    "write_idx_labels",
]

_CIFAR_PADDING = 4


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
      check_labels(y_train, NUM_CLASSES, f"TFDS {name} train labels"),
      x_test.astype(np.uint8),
      check_labels(y_test, NUM_CLASSES, f"TFDS {name} test labels"),
  )


_DIRECTORY_LOADERS = {
    "mnist": dataset_files.load_mnist_directory,
    "fashion_mnist": dataset_files.load_mnist_directory,
    "cifar10": dataset_files.load_cifar10_directory,
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
    return dataset_files.load_embedded_mnist()
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


def validation_split(x, y, num_validation, seed):
  """Randomly holds out `num_validation` examples.

  Returns:
    (x_train, y_train, x_val, y_val); the two parts are disjoint and together
    hold every example exactly once.
  """
  check_same_count(x, y)
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
  y = check_labels(y, num_classes)
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
  check_same_count(x, y)
  if not num_classes <= num_examples <= len(y):
    raise ValueError(
        f"num_examples must be in {num_classes}..{len(y)} "
        f"(at least one per class), got {num_examples}"
    )
  y = check_labels(y, num_classes)
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


# ---------------------------------------------------------------------------
# tf.data pipelines
# ---------------------------------------------------------------------------


def _scale_image(image):
  """Converts a uint8 image to float32 in [0, 1]."""
  return tf.cast(image, tf.float32) / 255.0


def _cifar_augment(image, crop_seed, flip_seed):
  """Zero-pads by 4, randomly crops back and randomly flips left-right.

  Stateless ops: the crop and the flip are functions of their [2] seeds.
  """
  height, width, channels = image.shape
  padded = tf.pad(image, [[_CIFAR_PADDING, _CIFAR_PADDING]] * 2 + [[0, 0]])
  image = tf.image.stateless_random_crop(padded, [height, width, channels], crop_seed)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


_AUGMENTATIONS = {"cifar": _cifar_augment}


def _training_stream(x, y, batch_size, shuffle, augment, seed, start_step):
  """The endless stream of ``make_tf_dataset(..., repeat=True)``.

  Example position i of the stream (0, 1, ...) is pass p = i // N over the N
  examples, at place i % N of that pass's order: a permutation drawn from
  (seed, p) if ``shuffle``, else the identity. Its augmentation is drawn from
  (seed, i). Starting at batch ``start_step`` skips only indices, not images.
  """
  num_examples = len(y)
  if not num_examples:
    raise ValueError("Cannot repeat an empty data set")
  if seed is None:
    seed = int(np.random.default_rng().integers(2**31))
  seed = tf.constant(seed, tf.int64)
  images, labels = tf.constant(x), tf.constant(y)
  start = start_step * batch_size
  first_pass, offset = divmod(start, num_examples)

  def one_pass(p):
    order = tf.range(num_examples, dtype=tf.int64)
    if shuffle:
      order = tf.random.experimental.stateless_shuffle(
          order, seed=tf.stack([seed, p]), alg="philox"
      )
    return tf.data.Dataset.from_tensor_slices(order)

  def example(position, index):
    image = _scale_image(tf.gather(images, index))
    if augment is not None:
      image = _AUGMENTATIONS[augment](
          image, tf.stack([seed, 2 * position]), tf.stack([seed, 2 * position + 1])
      )
    return image, tf.gather(labels, index)

  indices = tf.data.Dataset.counter(first_pass).flat_map(one_pass).skip(offset)
  dataset = tf.data.Dataset.zip(tf.data.Dataset.counter(start), indices)
  return (
      dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)
      .batch(batch_size)
      .prefetch(tf.data.AUTOTUNE)
  )


def make_tf_dataset(
    x,
    y,
    batch_size,
    training,
    augment=None,
    seed=None,
    cache=True,
    repeat=False,
    start_step=0,
    num_classes=None,
):
  """Builds a batched tf.data pipeline of float32 [0, 1] images and int64 labels.

  Args:
    x: uint8 images (N, H, W, C).
    y: integer labels (N,), checked by `check_labels` (a bad one is named with
      its index here, not inside ``fit``).
    batch_size: examples per batch (without ``repeat`` the last batch may be
      smaller).
    training: shuffle (seeded, reshuffled each pass) and augment if True;
      otherwise keep the order.
    augment: None, or "cifar" for zero padding by 4 pixels, a random crop
      back to the original size and a random horizontal flip, drawn
      independently per example and pass (training only).
    seed: seed for shuffling and augmentation (None: not reproducible).
    cache: keep the scaled float32 examples in memory after the first pass
      (4 bytes per pixel) instead of converting them again every pass (without
      ``repeat``; the repeated stream converts each batch's images).
    repeat: an endless stream with the examples repeated *before* batching, as
      the original code's ``shuffle().repeat().batch()``: every batch is full
      and a batch may span two passes. Pass p's order is a permutation drawn
      from (seed, p) when ``training`` and the augmentation of the i-th example
      of the stream is drawn from (seed, i): batch k depends on the seed and k
      only, so a resumed run (``start_step``) sees the batches of an
      uninterrupted one.
    start_step: with ``repeat``, the first batch is batch ``start_step`` of the
      stream (the skipped batches are not computed).
    num_classes: labels must lie in [0, num_classes) (None: only >= 0).

  Returns:
    A tf.data.Dataset of (images, labels) batches.
  """
  check_same_count(x, y)
  y = check_labels(y, num_classes, "y")
  if augment is not None and augment not in _AUGMENTATIONS:
    raise ValueError(
        f"Unknown augmentation {augment!r}; expected one of {list(_AUGMENTATIONS)}"
    )
  if augment is not None and not training:
    raise ValueError("Augmentation is only for training data sets")
  if start_step < 0 or (start_step and not repeat):
    raise ValueError(f"start_step={start_step} needs repeat=True and must be >= 0")
  if repeat:
    return _training_stream(x, y, batch_size, training, augment, seed, start_step)
  dataset = tf.data.Dataset.from_tensor_slices((x, y))
  dataset = dataset.map(
      lambda image, label: (_scale_image(image), label),
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  if cache:
    dataset = dataset.cache()
  if training:
    dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
  if augment is not None:
    randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    dataset = tf.data.Dataset.zip(dataset, randoms).map(
        lambda example, r: (
            _AUGMENTATIONS[augment](
                example[0], tf.stack([r, 0]), tf.stack([r, 1])
            ),
            example[1],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
