r"""The path to the paper's ImageNet run: InceptionV3 with the l1 large-margin loss.

  # TFDS imagenet2012, prepared from the manually downloaded ILSVRC2012 archives:
  python examples/imagenet.py --data_source=tfds --tfds_data_dir=~/tensorflow_datasets \
      --tfds_manual_dir=~/ilsvrc2012 --strategy=mirrored
  # or a directory DIR/train/<class>/*.JPEG, DIR/validation/<class>/*.JPEG:
  python examples/imagenet.py --data_source=DIR

keras.applications.InceptionV3 (weights=None, logits output), the l1 margin with
top_k 1 at the input by default (--margin_layers takes InceptionV3's "mixed0" ...
"mixed10" too), and the usual InceptionV3 recipe: RMSProp (rho 0.9, momentum 0.9,
epsilon 1.0), lr 0.045 decayed x0.94 every two epochs, gradient clipping 2. The
test metric is accuracy on ImageNet's validation split. Not trained here (no
accelerator); the test suite runs it for a few steps on small made-up images.
"""

import os

from absl import app
from absl import flags
import keras
import tensorflow as tf

import config as config_lib
import runner
from tf_large_margin import datasets

flags.DEFINE_integer(
    "image_size",
    299,
    "Images are resized to this square size (InceptionV3 needs >= 75).",
)
flags.DEFINE_string(
    "tfds_manual_dir",
    None,
    "Directory with the ILSVRC2012 archives "
    "TFDS prepares imagenet2012 from (--data_source=tfds).",
)
FLAGS = flags.FLAGS

ALL_MARGIN_LAYERS = ["input"] + [f"mixed{i}" for i in range(11)]
STEPS_PER_EPOCH = 1281167 // 256

# No validation split, subset or label noise: the test split is ImageNet's
# validation split.
NOT_FLAGS = ("num_validation", "num_train_examples", "noisy_label_fraction")
DEFAULTS = config_lib.define_flags(
    dict(
        data_source="tfds",
        loss="margin",
        dist_norm="1",
        gamma=1e4,
        alpha_factor=4.0,
        top_k=1,
        margin_epsilon=1e-6,
        margin_layers=["input"],
        layers_weights="none",
        xent_weight=0.0,
        optimizer="rmsprop",
        learning_rate=0.045,
        momentum=0.9,
        optimizer_epsilon=1.0,
        lr_schedule="exponential",
        lr_decay_rate=0.94,
        lr_decay_steps=2 * STEPS_PER_EPOCH,
        clip_norm=2.0,
        weight_decay=0.0,
        batch_size=256,
        train_steps=100 * STEPS_PER_EPOCH,
        steps_per_loop=1000,
        model_dir="/tmp/imagenet_margin",
    ),
    names=[name for name in config_lib.FIELDS if name not in NOT_FLAGS],
    helps=dict(
        data_source="'tfds' (imagenet2012, see --tfds_manual_dir) or a directory "
        "with train/<class>/ and validation/<class>/ image folders.",
        margin_layers="Layers the margin is enforced at: 'input' and/or "
        "InceptionV3's 'mixed0' ... 'mixed10', or 'all'.",
    ),
)


def run_config():
  """The `config.RunConfig` of the parsed flags."""
  return config_lib.from_flags()


def raw_splits(config):
  """(train, test) data sets of (image, label), and the number of classes."""
  if config.data_source == "tfds":
    train, test = (
        datasets.tfds_dataset(
            "imagenet2012",
            split,
            config.tfds_data_dir,
            config.tfds_download,
            FLAGS.tfds_manual_dir,
        )
        for split in ("train", "validation")
    )
    return train, test, 1000
  if not config.data_source or not os.path.isdir(config.data_source):
    raise ValueError(
        f"--data_source must be 'tfds' or a directory with train/ and "
        f"validation/ class folders; got {config.data_source!r}."
    )
  train, test = (
      keras.utils.image_dataset_from_directory(
          os.path.join(config.data_source, split),
          image_size=(FLAGS.image_size,) * 2,
          batch_size=None,
          shuffle=False,
      )
      for split in ("train", "validation")
  )
  if train.class_names != test.class_names:
    raise ValueError(
        f"train/ and validation/ of {config.data_source} have different "
        f"classes: {train.class_names} vs {test.class_names}."
    )
  return train, test, len(train.class_names)


def _resize(image):
  return tf.image.resize(tf.cast(image, tf.float32), [FLAGS.image_size] * 2) / 255.0


def train_pipeline(dataset, config, start_step):
  """Shuffled, repeated, resized float32 images in [0, 1] with random flips,
  batched, from batch ``start_step`` on: the order (a seeded shuffle) and the
  flips (drawn from the seed and the example's position) are functions of the
  step; a resumed run skips (reads again) the examples already trained on."""
  start = start_step * config.batch_size
  dataset = dataset.shuffle(10000, seed=config.seed).repeat().skip(start)

  def prepare(position, example):
    image, label = example
    flip_seed = tf.stack([tf.constant(config.seed, tf.int64), position])
    return tf.image.stateless_random_flip_left_right(_resize(image), flip_seed), label

  return (
      tf.data.Dataset.zip(tf.data.Dataset.counter(start), dataset)
      .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
      .batch(config.batch_size)
      .prefetch(tf.data.AUTOTUNE)
  )


def eval_pipeline(dataset, config):
  """Resized float32 images in [0, 1], batched."""
  return (
      dataset.map(
          lambda image, label: (_resize(image), label),
          num_parallel_calls=tf.data.AUTOTUNE,
      )
      .batch(config.batch_size)
      .prefetch(tf.data.AUTOTUNE)
  )


def main(_):
  config = run_config()
  strategy = runner.make_strategy(config)
  train, test, num_classes = raw_splits(config)

  def build_network():
    return keras.applications.InceptionV3(
        weights=None,
        input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
        classes=num_classes,
        classifier_activation=None,
    )

  data = runner.Data(
      train=lambda start_step: train_pipeline(train, config, start_step),
      validation=None,
      test=eval_pipeline(test, config),
      num_train_examples=int(train.cardinality()),
      num_classes=num_classes,
  )
  runner.train_and_evaluate(config, strategy, build_network, ALL_MARGIN_LAYERS, data)


if __name__ == "__main__":
  app.run(main)
