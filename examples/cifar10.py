r"""Trains a pre-activation ResNet on CIFAR-10 with the large-margin loss.

  python examples/cifar10.py --data_source=/path/to/cifar-10-batches-bin
  python examples/cifar10.py --data_source=tfds --tfds_data_dir=~/tensorflow_datasets
  python examples/cifar10.py --data_source=DIR --loss=xent --depth=20

As the paper's CIFAR-10 setup: a deep pre-activation ResNet, the l2 margin at the
input and at evenly spaced hidden layers (--num_margin_layers in all, input
included; the last is the final residual block), momentum SGD with the usual
step schedule (lr 0.1, x0.1 at 50 % and 75 % of training), weight decay, pad-4
random-crop and flip augmentation, a 45k/5k train/validation split. Not trained
here (no GPU): the defaults are the usual ResNet recipe, not tuned values; gamma in
particular should be searched on the validation split (see
examples/REPRODUCTION.md on gamma's units).
"""

from absl import app
from absl import flags

import config as config_lib
import runner
from tf_large_margin import architectures

DEPTH, NUM_MARGIN_LAYERS = 56, 5
flags.DEFINE_integer("depth", DEPTH, "ResNet depth, 6 n + 2 (8 for a quick test).")
flags.DEFINE_integer("width", 16, "Filters of the first stage.")
flags.DEFINE_integer(
    "num_margin_layers",
    NUM_MARGIN_LAYERS,
    "Margin layers: the input and this many - 1 evenly spaced residual block "
    "outputs (unless --margin_layers is given).",
)
FLAGS = flags.FLAGS


def block_names(depth):
  """Names of the residual blocks' outputs of `architectures.cifar_resnet`."""
  return [f"block{i}" for i in range((depth - 2) // 6 * 3)]


def evenly_spaced_margin_layers(depth, num_margin_layers):
  """The input and ``num_margin_layers - 1`` evenly spaced residual blocks."""
  return ["input"] + architectures.evenly_spaced(
      block_names(depth), num_margin_layers - 1
  )


DEFAULTS = config_lib.define_flags(
    dict(
        data_source="tfds",
        num_validation=5000,
        loss="margin",
        dist_norm="2",
        gamma=1e4,
        alpha_factor=4.0,
        top_k=1,
        margin_epsilon=1e-6,
        margin_layers=evenly_spaced_margin_layers(DEPTH, NUM_MARGIN_LAYERS),
        layers_weights="none",
        xent_weight=0.0,
        optimizer="momentum",
        momentum=0.9,
        learning_rate=0.1,
        lr_schedule="piecewise",
        lr_boundaries=[0.5, 0.75],
        lr_decay_rate=0.1,
        clip_norm=0.0,
        weight_decay=2e-4,
        batch_size=128,
        train_steps=80000,
        steps_per_loop=1000,
        model_dir="/tmp/cifar10_margin",
    ),
    helps=dict(
        margin_layers="Layers the margin is enforced at: layer names ('input', "
        "'block0', ...) or 'all'. Not given: the input and --num_margin_layers - 1 "
        "evenly spaced residual blocks of the --depth network (the default shown "
        "is that of the default --depth and --num_margin_layers).",
    ),
)


def run_config():
  """The `config.RunConfig` of the parsed flags (margin layers from --depth and
  --num_margin_layers unless --margin_layers is given)."""
  config = config_lib.from_flags()
  if not FLAGS["margin_layers"].present:
    config = config.replace(
        margin_layers=evenly_spaced_margin_layers(FLAGS.depth, FLAGS.num_margin_layers)
    )
  return config


def main(_):
  config = run_config()
  strategy = runner.make_strategy(config)
  splits = runner.load_splits("cifar10", config)
  runner.train_and_evaluate(
      config,
      strategy,
      lambda: architectures.cifar_resnet(FLAGS.depth, width=FLAGS.width),
      ["input"] + block_names(FLAGS.depth),
      runner.numpy_data(splits, config, augment="cifar"),
  )


if __name__ == "__main__":
  app.run(main)
