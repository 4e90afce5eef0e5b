"""What the example scripts share: flags, strategy, data, loss, training, results.

Each script (mnist.py, cifar10.py, imagenet.py) defines its own network and
defaults and calls `train_and_evaluate`. Training runs in "loops" of
``--steps_per_loop`` steps (Keras epochs): after each loop the model is checked on
the validation split (if any), a resumable backup is written to
``<model_dir>/backup`` and TensorBoard / CSV logs are updated. A run that is killed
continues, when started again with the same flags, from its last completed loop.

Outputs in ``--model_dir``: ``results.json`` (flags, clean test accuracy, per-loop
history), ``model.keras`` (final model), ``history.csv``, ``tensorboard/`` and, with
a validation split, ``best.weights.h5`` (best validation accuracy). Under
--loss=lsoftmax|sphereface the model returns [cos, scale] (2C columns):
`tf_large_margin.layers.logits_model` gives its logits (examples/evaluate.py
applies it); their target logit is annealed as in the papers (--lambda_*
flags, advanced by a `tf_large_margin.LambdaScheduler` callback).
"""

import csv
import json
import os
import sys
import time

from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import datasets
from tf_large_margin.optimizers import RMSpropTF1
from tf_large_margin.regularizers import apply_weight_decay

import lambda_flags

FLAGS = flags.FLAGS
ALL = "all"

# Data.
flags.DEFINE_string(
    "data_source",
    None,
    "'embedded' (MNIST sample shipped with the "
    "package), 'tfds', or a directory with the data set's files.",
)
flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory (--data_source=tfds).")
flags.DEFINE_bool("tfds_download", False, "Let TFDS download missing data.")
flags.DEFINE_integer(
    "num_validation",
    0,
    "Training examples held out for validation (0: none). The paper: 5000.",
)
flags.DEFINE_float(
    "noisy_label_fraction",
    0.0,
    "Fraction of training labels replaced "
    "by a different random class (also on the validation split).",
)
flags.DEFINE_integer(
    "num_train_examples", 0, "Class-balanced training subset size (0: all)."
)
flags.DEFINE_integer(
    "seed", 0, "Seed of the split, noise, subset, shuffling and initialisation."
)
# Loss.
flags.DEFINE_enum(
    "loss",
    "margin",
    [
        "xent",
        "hinge",
        "margin",
        "jacobian",
        "amsoftmax",
        "arcface",
        "lsoftmax",
        "sphereface",
    ],
    "Training loss: cross-entropy, Crammer-Singer hinge (+ --xent_weight "
    "xent), Eq. 10 margin, hinge + Jacobian regulariser (Sokolic et al.), "
    "or AM-Softmax/CosFace, ArcFace, L-Softmax, A-Softmax/SphereFace on a "
    "CosineHead replacing the logits layer.",
)
flags.DEFINE_float(
    "jacobian_weight", 0.1, "--loss=jacobian: regulariser weight lambda."
)
flags.DEFINE_enum(
    "jacobian_variant",
    "random",
    ["random", "all"],
    "--loss=jacobian: one random class row per example, or all rows.",
)
flags.DEFINE_float(
    "cosine_margin", None, "--loss=amsoftmax|arcface: margin m (default 0.35 / 0.5)."
)
flags.DEFINE_float("cosine_scale", 30.0, "--loss=amsoftmax|arcface: scale s.")
flags.DEFINE_integer(
    "multiplicative_margin",
    None,
    "--loss=lsoftmax|sphereface: integer angular margin m >= 1, the target "
    "logit uses cos(m theta) (1: plain softmax; default: the library's, 2 for "
    "L-Softmax, 4 for SphereFace).",
)
flags.DEFINE_float("gamma", 1e4, "Margin gamma, in the units of the margin layers.")
flags.DEFINE_float(
    "alpha_factor", 4.0, "Distances are clipped below at gamma * (1 - alpha_factor)."
)
flags.DEFINE_integer("top_k", 1, "Competing classes per example.")
flags.DEFINE_enum("dist_norm", "inf", ["1", "2", "inf"], "Norm of the distances.")
flags.DEFINE_float("margin_epsilon", 1e-6, "Epsilon added to the gradient norms.")
flags.DEFINE_list(
    "margin_layers",
    ["input", "conv0", "conv1"],
    "Layers the margin is enforced at: layer names and/or 'input', or 'all'.",
)
flags.DEFINE_enum(
    "layers_weights",
    "none",
    ["none", "size"],
    "Per-layer weights: "
    "'size' divides each layer's gradient norm by its size (original).",
)
flags.DEFINE_float(
    "xent_weight",
    0.0,
    "Weight of the cross-entropy added to the margin or hinge loss.",
)
# Optimisation.
flags.DEFINE_enum(
    "optimizer",
    "rmsprop_tf1",
    ["rmsprop_tf1", "rmsprop", "momentum", "adam"],
    "rmsprop_tf1: TF1 RMSProp semantics (accumulators start at 1); "
    "rmsprop: Keras'; momentum: SGD with --momentum.",
)
flags.DEFINE_float("learning_rate", 0.1, "Initial learning rate.")
flags.DEFINE_float("momentum", 0.0, "Momentum (rmsprop*, momentum).")
flags.DEFINE_float("optimizer_epsilon", 1e-2, "Epsilon of RMSProp / Adam.")
flags.DEFINE_enum(
    "lr_schedule",
    "exponential",
    ["constant", "exponential", "piecewise"],
    "exponential: x lr_decay_rate every lr_decay_steps (staircase); "
    "piecewise: x lr_decay_rate at each of lr_boundaries.",
)
flags.DEFINE_float("lr_decay_rate", 0.96, "Learning-rate decay factor.")
flags.DEFINE_integer("lr_decay_steps", 2000, "Steps between exponential decays.")
flags.DEFINE_list(
    "lr_boundaries",
    ["0.5", "0.75"],
    "Piecewise schedule: fractions of "
    "the training steps where the rate is multiplied by lr_decay_rate.",
)
flags.DEFINE_float("clip_norm", 5.0, "Global gradient-norm clipping (0: none).")
flags.DEFINE_float(
    "weight_decay",
    0.0,
    "Adds weight_decay * sum(v^2) / 2 over all trainable variables to the loss.",
)
# Run.
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("train_steps", 1500, "Training steps (unless --epochs).")
flags.DEFINE_integer(
    "epochs",
    0,
    "If > 0: train this many passes over the training "
    "set instead of --train_steps (one loop per pass).",
)
flags.DEFINE_integer(
    "steps_per_loop",
    100,
    "Steps between validation, checkpoint and logs (must divide --train_steps).",
)
flags.DEFINE_string(
    "model_dir",
    "/tmp/tf_large_margin",
    "Output directory; a run resumes from the backup found there.",
)
flags.DEFINE_enum(
    "strategy",
    "default",
    ["default", "mirrored", "multi_worker"],
    "tf.distribute strategy; multi_worker reads TF_CONFIG.",
)
flags.DEFINE_integer(
    "num_logical_cpus",
    0,
    "If > 1: split the CPU into this many "
    "logical devices (mirrored training on a CPU-only machine).",
)
flags.DEFINE_integer(
    "verbose",
    1,
    "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per loop.",
)


def set_defaults(values):
  """Sets flag defaults; flags given on the command line keep their value."""
  for name, value in values.items():
    FLAGS.set_default(name, value)


# ---------------------------------------------------------------------------
# Strategy
# ---------------------------------------------------------------------------


def make_strategy():
  """The --strategy; call before TensorFlow runs any operation."""
  if FLAGS.num_logical_cpus > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.num_logical_cpus
    )
  if FLAGS.strategy == "mirrored":
    devices = None
    if not tf.config.list_logical_devices("GPU"):
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)
  if FLAGS.strategy == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  return tf.distribute.get_strategy()


def _tf_config():
  """(task, cluster) of TF_CONFIG; ({}, {}) when it is not set."""
  config = json.loads(os.environ.get("TF_CONFIG") or "{}")
  return config.get("task", {}), config.get("cluster", {})


def is_chief():
  """True unless TF_CONFIG names this task something else than the chief (the
  "chief" task, or worker 0 of a cluster without one)."""
  task, cluster = _tf_config()
  if not task:
    return True
  if "chief" in cluster:
    return task["type"] == "chief"
  return task["type"] == "worker" and task["index"] == 0


def output_dir():
  """--model_dir on the chief; a scratch subdirectory on other workers."""
  if is_chief():
    return FLAGS.model_dir
  task, _ = _tf_config()
  return os.path.join(FLAGS.model_dir, "workers", f"{task['type']}_{task['index']}")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_splits(name, num_classes=datasets.NUM_CLASSES):
  """Loads data set ``name`` with the data flags: train / validation / test arrays.

  Returns:
    dict with keys "train", "validation" (None without --num_validation) and
    "test", each an (images uint8 NHWC, labels int64) pair.
  """
  x_train, y_train, x_test, y_test = datasets.load_dataset(
      name, FLAGS.data_source, FLAGS.tfds_data_dir, FLAGS.tfds_download
  )
  validation = None
  if FLAGS.num_validation:
    x_train, y_train, x_val, y_val = datasets.validation_split(
        x_train, y_train, FLAGS.num_validation, FLAGS.seed
    )
    validation = (x_val, y_val)
  if FLAGS.num_train_examples:
    x_train, y_train = datasets.balanced_subset(
        x_train, y_train, FLAGS.num_train_examples, num_classes, FLAGS.seed
    )
  if FLAGS.noisy_label_fraction:
    y_train, _ = datasets.noisy_labels(
        y_train, FLAGS.noisy_label_fraction, num_classes, FLAGS.seed
    )
    if validation is not None:
      validation = (
          validation[0],
          datasets.noisy_labels(
              validation[1], FLAGS.noisy_label_fraction, num_classes, FLAGS.seed + 1
          )[0],
      )
  return {
      "train": (x_train, y_train),
      "validation": validation,
      "test": (x_test, y_test),
  }


def _shardable(dataset):
  """Lets multi-worker training shard an in-memory data set by example."""
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA
  )
  return dataset.with_options(options)


def numpy_pipelines(splits, augment=None):
  """tf.data pipelines of ``load_splits``' arrays: (train, validation or None,
  test) and the number of training examples. The training examples are repeated
  before batching, as the original code: every batch is full."""

  def pipeline(split, training):
    x, y = split
    return _shardable(
        datasets.make_tf_dataset(
            x,
            y,
            FLAGS.batch_size,
            training,
            augment=augment if training else None,
            seed=FLAGS.seed,
            repeat=training,
        )
    )

  validation = splits["validation"]
  return (
      pipeline(splits["train"], True),
      None if validation is None else pipeline(validation, False),
      pipeline(splits["test"], False),
      len(splits["train"][1]),
  )


# ---------------------------------------------------------------------------
# Loss, optimizer, model
# ---------------------------------------------------------------------------


# The losses on a CosineHead (configured by the loss's `head_config`) that
# replaces the logits layer: --loss -> (loss class, {loss argument: flag}); a
# flag left at None gives the library's default.
_COSINE_FLAGS = {"margin": "cosine_margin", "scale": "cosine_scale"}
_MULTIPLICATIVE_FLAGS = {"m": "multiplicative_margin"}
COSINE_LOSSES = {
    "amsoftmax": (tlm.AMSoftmax, _COSINE_FLAGS),
    "arcface": (tlm.ArcFace, _COSINE_FLAGS),
    "lsoftmax": (tlm.LSoftmax, _MULTIPLICATIVE_FLAGS),
    "sphereface": (tlm.SphereFace, _MULTIPLICATIVE_FLAGS),
}


def make_loss():
  """The --loss with its flags."""
  if FLAGS.loss == "xent":
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if FLAGS.loss in ("hinge", "jacobian"):
    return tlm.MulticlassHinge(cross_entropy_weight=FLAGS.xent_weight)
  if FLAGS.loss in COSINE_LOSSES:
    loss, arguments = COSINE_LOSSES[FLAGS.loss]
    values = {name: FLAGS[flag].value for name, flag in arguments.items()}
    kwargs = {name: v for name, v in values.items() if v is not None}
    if issubclass(loss, tlm.LSoftmax):
      kwargs["lambda_"] = lambda_flags.annealing_lambda()
    return loss(**kwargs)
  dist_norm = np.inf if FLAGS.dist_norm == "inf" else int(FLAGS.dist_norm)
  return tlm.LargeMarginLoss(
      gamma=FLAGS.gamma,
      alpha_factor=FLAGS.alpha_factor,
      top_k=FLAGS.top_k,
      dist_norm=dist_norm,
      epsilon=FLAGS.margin_epsilon,
      cross_entropy_weight=FLAGS.xent_weight,
  )


def learning_rate(train_steps):
  """The --lr_schedule over ``train_steps`` steps."""
  if FLAGS.lr_schedule == "constant":
    return FLAGS.learning_rate
  if FLAGS.lr_schedule == "exponential":
    return keras.optimizers.schedules.ExponentialDecay(
        FLAGS.learning_rate, FLAGS.lr_decay_steps, FLAGS.lr_decay_rate, staircase=True
    )
  boundaries = [int(float(f) * train_steps) for f in FLAGS.lr_boundaries]
  values = [
      FLAGS.learning_rate * FLAGS.lr_decay_rate**i for i in range(len(boundaries) + 1)
  ]
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(train_steps):
  """The --optimizer with its learning rate schedule and gradient clipping."""
  kwargs = dict(
      learning_rate=learning_rate(train_steps), global_clipnorm=FLAGS.clip_norm or None
  )
  if FLAGS.optimizer == "momentum":
    return keras.optimizers.SGD(momentum=FLAGS.momentum, **kwargs)
  if FLAGS.optimizer == "adam":
    return keras.optimizers.Adam(epsilon=FLAGS.optimizer_epsilon, **kwargs)
  rmsprop = RMSpropTF1 if FLAGS.optimizer == "rmsprop_tf1" else keras.optimizers.RMSprop
  return rmsprop(momentum=FLAGS.momentum, epsilon=FLAGS.optimizer_epsilon, **kwargs)


def margin_layer_names(all_layers):
  """--margin_layers, with 'all' expanded to ``all_layers``."""
  names = list(FLAGS.margin_layers)
  if ALL in names:
    if names != [ALL]:
      raise ValueError(f"--margin_layers=all cannot be combined with names: {names}")
    return list(all_layers)
  return names


def wrap_network(network, all_margin_layers):
  """The model --loss trains: a MarginModel around ``network`` (logits output), a
  JacobianModel (features = the input of the last layer), or, for the cosine
  losses, a MarginModel whose last layer is replaced by the `CosineHead` the loss
  expects (for L-Softmax / SphereFace its output is [cos, scale], 2C columns)."""
  if FLAGS.loss == "jacobian":
    return tlm.JacobianModel(
        network.inputs,
        network.outputs[0],
        feature_layer=network.layers[-2].name,
        jacobian_weight=FLAGS.jacobian_weight,
        variant=FLAGS.jacobian_variant,
        seed=FLAGS.seed,
    )
  if FLAGS.loss in COSINE_LOSSES:
    head = network.layers[-1]
    loss = COSINE_LOSSES[FLAGS.loss][0]
    outputs = tlm.CosineHead(
        head.units, name=f"{head.name}_cosine", **loss.head_config
    )(head.input)
    network = keras.Model(network.inputs, outputs, name=network.name)
  return tlm.MarginModel.from_model(
      network,
      margin_layers=margin_layer_names(all_margin_layers),
      layers_weights=None if FLAGS.layers_weights == "none" else FLAGS.layers_weights,
  )


def compile_model(network, all_margin_layers, train_steps):
  """Wraps ``network`` (logits output) as --loss needs (`wrap_network`) and compiles
  it (call under the strategy's scope)."""
  model = wrap_network(network, all_margin_layers)
  if FLAGS.weight_decay:
    apply_weight_decay(model, FLAGS.weight_decay)
  model.compile(
      make_optimizer(train_steps),
      loss=make_loss(),
      metrics=[tlm.layers.accuracy_metric(model)],
  )
  return model


# ---------------------------------------------------------------------------
# Training and results
# ---------------------------------------------------------------------------


def schedule(num_train_examples):
  """(loops, steps per loop) from --epochs or --train_steps / --steps_per_loop.

  A flag typed on the command line wins over a --config default: --train_steps
  typed alone trains that many steps even where the config sets --epochs; typing
  both a positive --epochs and --train_steps is an error.
  """
  typed_steps, typed_epochs = FLAGS["train_steps"].present, FLAGS["epochs"].present
  if typed_steps and typed_epochs and FLAGS.epochs > 0:
    raise ValueError(
        f"--epochs={FLAGS.epochs} and --train_steps={FLAGS.train_steps} conflict: "
        "give one of them."
    )
  if FLAGS.epochs > 0 and not (typed_steps and not typed_epochs):
    # As the original: num_examples // batch_size steps per epoch (batches are
    # full and may span two epochs, see numpy_pipelines).
    return FLAGS.epochs, max(1, num_train_examples // FLAGS.batch_size)
  steps_per_loop = min(FLAGS.steps_per_loop, FLAGS.train_steps)
  if steps_per_loop < 1 or FLAGS.train_steps % steps_per_loop:
    raise ValueError(
        f"--steps_per_loop={FLAGS.steps_per_loop} must divide "
        f"--train_steps={FLAGS.train_steps}."
    )
  return FLAGS.train_steps // steps_per_loop, steps_per_loop


def read_history(path):
  """Per-loop rows of the CSV log (the last row of a loop run twice wins; metrics
  Keras logged as "NA" are left out)."""
  if not os.path.exists(path):
    return []
  with open(path, newline="", encoding="utf-8") as f:
    rows = {int(row["epoch"]): row for row in csv.DictReader(f)}
  return [
      {k: float(v) for k, v in rows[epoch].items() if v != "NA"}
      for epoch in sorted(rows)
  ]


def make_callbacks(directory, has_validation):
  """Logs, resumable backup and (with validation) the best-on-validation weights.

  Without a backup to resume from, the run starts afresh: the history and best
  weights of an earlier finished run in ``directory`` are removed.
  """
  history_path = os.path.join(directory, "history.csv")
  best_path = os.path.join(directory, "best.weights.h5")
  backup_dir = os.path.join(directory, "backup")
  if not os.path.exists(backup_dir):
    for path in (history_path, best_path):
      if os.path.exists(path):
        os.remove(path)
  callbacks = [
      # Advances the lambda schedule of --loss=lsoftmax|sphereface (else no-op).
      tlm.LambdaScheduler(),
      keras.callbacks.TensorBoard(os.path.join(directory, "tensorboard")),
      keras.callbacks.CSVLogger(history_path, append=True),
      keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True),
  ]
  if has_validation:
    best_so_far = max(
        (row["val_accuracy"] for row in read_history(history_path)), default=None
    )
    callbacks.append(
        keras.callbacks.ModelCheckpoint(
            best_path,
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best_so_far,
        )
    )
  return callbacks


def script_flags():
  """{name: value} of the flags of this module, of `lambda_flags` and of the
  running script."""
  names = [
      f.name
      for module in (__name__, lambda_flags.__name__, sys.argv[0])
      for f in FLAGS.get_flags_for_module(module)
  ]
  return {name: FLAGS[name].value for name in sorted(names)}


def train_and_evaluate(
    strategy,
    build_network,
    all_margin_layers,
    train,
    validation,
    test,
    num_train_examples,
):
  """Trains the network with the flags, evaluates it, writes the results.

  Args:
    strategy: from `make_strategy`.
    build_network: () -> functional Keras model with logits output (called under
      the strategy's scope).
    all_margin_layers: what --margin_layers=all means for this network.
    train: repeated tf.data training pipeline of (image, label) batches.
    validation, test: tf.data pipelines (validation may be None).
    num_train_examples: training set size (for --epochs).

  Returns:
    The results dict (also written to <model_dir>/results.json on the chief).
  """
  loops, steps_per_loop = schedule(num_train_examples)
  directory = output_dir()
  os.makedirs(directory, exist_ok=True)
  keras.utils.set_random_seed(FLAGS.seed)
  with strategy.scope():
    model = compile_model(build_network(), all_margin_layers, loops * steps_per_loop)
  start = time.time()
  model.fit(
      train,
      epochs=loops,
      steps_per_epoch=steps_per_loop,
      validation_data=validation,
      verbose=FLAGS.verbose,
      shuffle=False,
      callbacks=make_callbacks(directory, validation is not None),
  )
  results = {
      "flags": script_flags(),
      "train_steps": loops * steps_per_loop,
      "num_train_examples": num_train_examples,
      "num_replicas": strategy.num_replicas_in_sync,
      "train_seconds_this_run": time.time() - start,
      "test_accuracy": model.evaluate(test, verbose=0, return_dict=True)["accuracy"],
      "history": [
          dict(row, step=(int(row["epoch"]) + 1) * steps_per_loop)
          for row in read_history(os.path.join(directory, "history.csv"))
      ],
  }
  model.save(os.path.join(directory, "model.keras"))
  if validation is not None:
    results.update(best_on_validation(model, results["history"], directory, test))
  if is_chief():
    with open(os.path.join(directory, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  logging.info("Results in %s", directory)
  print(f"clean test accuracy: {results['test_accuracy']:.4f}")
  return results


def best_on_validation(model, history, directory, test):
  """Test accuracy of the best-on-validation weights (model selection)."""
  best = max(history, key=lambda row: row["val_accuracy"])
  model.load_weights(os.path.join(directory, "best.weights.h5"))
  return {
      "best_validation_accuracy": best["val_accuracy"],
      "best_validation_step": best["step"],
      "best_validation_test_accuracy": model.evaluate(
          test, verbose=0, return_dict=True
      )["accuracy"],
  }
