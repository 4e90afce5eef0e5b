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

import common
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

DEFAULTS = dict(
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
)


def raw_splits():
  """(train, test) data sets of (image, label), and the number of classes."""
  if FLAGS.data_source == "tfds":
    train, test = (
        datasets.tfds_dataset(
            "imagenet2012",
            split,
            FLAGS.tfds_data_dir,
            FLAGS.tfds_download,
            FLAGS.tfds_manual_dir,
        )
        for split in ("train", "validation")
    )
    return train, test, 1000
  if not FLAGS.data_source or not os.path.isdir(FLAGS.data_source):
    raise ValueError(
        f"--data_source must be 'tfds' or a directory with train/ and "
        f"validation/ class folders; got {FLAGS.data_source!r}."
    )
  train, test = (
      keras.utils.image_dataset_from_directory(
          os.path.join(FLAGS.data_source, split),
          image_size=(FLAGS.image_size,) * 2,
          batch_size=None,
          shuffle=False,
      )
      for split in ("train", "validation")
  )
  if train.class_names != test.class_names:
    raise ValueError(
        f"train/ and validation/ of {FLAGS.data_source} have different "
        f"classes: {train.class_names} vs {test.class_names}."
    )
  return train, test, len(train.class_names)


def pipeline(dataset, training):
  """Resized float32 images in [0, 1] (random flips when training), batched."""
  size = [FLAGS.image_size] * 2

  def prepare(image, label):
    image = tf.image.resize(tf.cast(image, tf.float32), size) / 255.0
    if training:
      image = tf.image.random_flip_left_right(image, seed=FLAGS.seed)
    return image, label

  if training:
    dataset = dataset.shuffle(10000, seed=FLAGS.seed).repeat()
  return (
      dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
      .batch(FLAGS.batch_size)
      .prefetch(tf.data.AUTOTUNE)
  )


def main(_):
  common.set_defaults(DEFAULTS)
  if FLAGS.num_validation or FLAGS.num_train_examples or FLAGS.noisy_label_fraction:
    raise ValueError(
        "imagenet.py has no --num_validation, --num_train_examples or "
        "--noisy_label_fraction (the test split is ImageNet's validation "
        "split)."
    )
  strategy = common.make_strategy()
  train, test, num_classes = raw_splits()
  num_train = int(train.cardinality())

  def build_network():
    return keras.applications.InceptionV3(
        weights=None,
        input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
        classes=num_classes,
        classifier_activation=None,
    )

  common.train_and_evaluate(
      strategy,
      build_network,
      ALL_MARGIN_LAYERS,
      pipeline(train, True),
      None,
      pipeline(test, False),
      num_train,
  )


if __name__ == "__main__":
  app.run(main)
