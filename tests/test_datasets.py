"""Tests for tf_large_margin.datasets: sources, splits, noise, subsets and the
tf.data pipelines (offline: all files are written here)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import datasets
from dataset_writers import assert_arrays_equal
from dataset_writers import random_images
from dataset_writers import random_labels
from dataset_writers import write_cifar_dir
from dataset_writers import write_mnist_dir


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


def test_load_dataset_tfds_checks_labels(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  labels = tf.constant([0, 12, 3], tf.int64)
  split = (tf.zeros((3, 2, 2, 1), tf.uint8), labels)
  monkeypatch.setattr(tfds, "load", lambda name, **kwargs: [split, split])
  with pytest.raises(
      ValueError, match=r"TFDS mnist train labels: label 12 at index 1 is outside"
  ):
    datasets.load_dataset("mnist", "tfds")


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


def stream_batches(x, y, steps, start_step=0, **kwargs):
  """The first ``steps`` batches of a repeated stream starting at ``start_step``."""
  dataset = datasets.make_tf_dataset(
      x, y, 4, training=True, seed=3, repeat=True, start_step=start_step, **kwargs
  )
  return list(dataset.take(steps).as_numpy_iterator())


def test_make_tf_dataset_repeated_stream_is_a_function_of_the_step():
  """Batch k of the stream depends on the seed and k only: a stream started at
  ``start_step`` (a resumed run) continues an uninterrupted one exactly, across
  passes, and the training images stay paired with their labels."""
  x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  y = np.arange(10)
  full = stream_batches(x, y, 9)
  for start_step in (1, 2, 3, 7):
    resumed = stream_batches(x, y, 9 - start_step, start_step)
    for (x_full, y_full), (x_resumed, y_resumed) in zip(full[start_step:], resumed):
      np.testing.assert_array_equal(x_resumed, x_full)
      np.testing.assert_array_equal(y_resumed, y_full)
  labels = np.concatenate([b[1] for b in full])
  np.testing.assert_allclose(np.concatenate([b[0] for b in full]).ravel() * 255, labels)
  passes = labels[:30].reshape(3, 10)
  assert all(sorted(p) == list(range(10)) for p in passes)
  assert len({tuple(p) for p in passes}) == 3  # a new permutation per pass
  other_seed = datasets.make_tf_dataset(x, y, 4, True, seed=4, repeat=True)
  assert not np.array_equal(next(iter(other_seed))[1], full[0][1])


def test_make_tf_dataset_repeated_stream_without_training_keeps_the_order():
  x = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1)
  dataset = datasets.make_tf_dataset(x, np.arange(6), 4, False, repeat=True)
  labels = np.concatenate([b[1] for b in dataset.take(3).as_numpy_iterator()])
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])


def test_make_tf_dataset_repeated_stream_augmentation_resumes_exactly():
  x = random_images(10, (32, 32, 3))
  y = np.arange(10)
  full = stream_batches(x, y, 6, augment="cifar")
  resumed = stream_batches(x, y, 2, 4, augment="cifar")
  for (x_full, _), (x_resumed, _) in zip(full[4:], resumed):
    np.testing.assert_array_equal(x_resumed, x_full)
  # Fresh draws per pass: the same example is augmented differently.
  images, labels = (np.concatenate(parts) for parts in zip(*full))
  first, second = (np.flatnonzero(labels == 0)[i] for i in (0, 1))
  assert not np.array_equal(images[first], images[second])
  assert _crop_kind(np.round(images[first] * 255).astype(np.uint8), x[0])


def test_make_tf_dataset_start_step_needs_repeat():
  with pytest.raises(ValueError, match=r"start_step=2 needs repeat=True"):
    datasets.make_tf_dataset(np.zeros((2, 1, 1, 1)), [0, 1], 2, True, start_step=2)


def test_make_tf_dataset_checks_the_labels():
  """A label outside [0, num_classes) is named with its index where the data enter
  (not as a graph error inside fit)."""
  x = np.zeros((4, 1, 1, 1), np.uint8)
  with pytest.raises(ValueError, match=r"y: label 10 at index 2 is outside 0\.\.9"):
    datasets.make_tf_dataset(x, [0, 1, 10, 2], 2, True, num_classes=10)
  with pytest.raises(ValueError, match=r"y: label -1 at index 3 is outside >= 0"):
    datasets.make_tf_dataset(x, [0, 1, 2, -1], 2, False, repeat=True)
  with pytest.raises(ValueError, match=r"x has 4 images but y has 3 labels"):
    datasets.make_tf_dataset(x, [0, 1, 2], 2, False)


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
