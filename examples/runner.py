"""The runner the example scripts share: strategy, data, model, training, results.

A script (mnist.py, cifar10.py, imagenet.py, compare_methods.py) defines its
network and its defaults (a `config.RunConfig`, as flags) and calls
`train_and_evaluate`:

    from config import RunConfig
    import runner

    config = RunConfig(data_source="embedded", loss="margin", train_steps=200,
                       steps_per_loop=50, model_dir="/tmp/run")
    strategy = runner.make_strategy(config)
    data = runner.numpy_data(runner.load_splits("mnist", config), config)
    results, model = runner.train_and_evaluate(
        config, strategy, tf_large_margin.architectures.mnist_cnn,
        ["input", "conv0", "conv1", "fc0", "logits"], data)

Training runs in loops (`training.py`): after each loop the model is checked on
the validation split (if any), TensorBoard / CSV logs are updated and a
resumable checkpoint is written to ``<model_dir>/checkpoint`` (also every
``checkpoint_steps`` steps). A run that is killed continues, when started again
with the same settings, from its last checkpoint and ends as an uninterrupted
run would.

Outputs in ``model_dir``: ``results.json`` (settings, clean test accuracy,
per-loop history), ``model.keras`` (final model), ``history.csv``,
``tensorboard/`` and, with a validation split, ``best.weights.h5`` (best
validation accuracy). Under --loss=lsoftmax|sphereface the model returns
[cos, scale] (2C columns): `tf_large_margin.layers.logits_model` gives its logits
(examples/evaluate.py applies it); their target logit is annealed as in the
papers (--lambda_* settings, advanced by a `tf_large_margin.LambdaScheduler`
callback).
"""

import dataclasses
import json
import os
import time
import typing

from absl import logging
import keras
import numpy as np
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import datasets
from tf_large_margin.optimizers import RMSpropTF1
from tf_large_margin.regularizers import apply_weight_decay

import config as config_lib
import training

ALL = "all"


# ---------------------------------------------------------------------------
# Strategy
# ---------------------------------------------------------------------------


def make_strategy(config):
  """The strategy of ``config``; call before TensorFlow runs any operation."""
  if config.num_logical_cpus > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * config.num_logical_cpus
    )
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  if config.strategy == "mirrored":
    devices = None
    if not tf.config.list_logical_devices("GPU"):
      devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)
  if config.strategy == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  return tf.distribute.get_strategy()


def _tf_config():
  """(task, cluster) of TF_CONFIG; ({}, {}) when it is not set."""
  tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
  return tf_config.get("task", {}), tf_config.get("cluster", {})


def is_chief():
  """True unless TF_CONFIG names this task something else than the chief (the
  "chief" task, or worker 0 of a cluster without one)."""
  task, cluster = _tf_config()
  if not task:
    return True
  if "chief" in cluster:
    return task["type"] == "chief"
  return task["type"] == "worker" and task["index"] == 0


def output_dir(config):
  """``model_dir`` on the chief; a scratch subdirectory on other workers."""
  if is_chief():
    return config.model_dir
  task, _ = _tf_config()
  return os.path.join(config.model_dir, "workers", f"{task['type']}_{task['index']}")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  """What `train_and_evaluate` trains and tests on.

  Attributes:
    train: start_step -> endless tf.data set of (image, label) training batches
      from batch ``start_step`` on (a function of the step: see `training.py`).
    validation: tf.data set of batches, or None.
    test: tf.data set of batches.
    num_train_examples: training set size (for --epochs).
    num_classes: labels lie in [0, num_classes); the network must have as many
      outputs.
  """

  train: typing.Callable[[int], tf.data.Dataset]
  validation: typing.Optional[tf.data.Dataset]
  test: tf.data.Dataset
  num_train_examples: int
  num_classes: int


def load_splits(name, config, num_classes=datasets.NUM_CLASSES):
  """Loads data set ``name`` with the data settings of ``config``.

  Returns:
    dict with keys "train", "validation" (None without num_validation) and
    "test", each an (images uint8 NHWC, labels int64) pair whose labels were
    checked to lie in [0, num_classes) (a bad one is named with its index).
  """
  x_train, y_train, x_test, y_test = datasets.load_dataset(
      name, config.data_source, config.tfds_data_dir, config.tfds_download
  )
  y_train = datasets.check_labels(y_train, num_classes, f"{name} training labels")
  y_test = datasets.check_labels(y_test, num_classes, f"{name} test labels")
  validation = None
  if config.num_validation:
    x_train, y_train, x_val, y_val = datasets.validation_split(
        x_train, y_train, config.num_validation, config.seed
    )
    validation = (x_val, y_val)
  if config.num_train_examples:
    x_train, y_train = datasets.balanced_subset(
        x_train, y_train, config.num_train_examples, num_classes, config.seed
    )
  if config.noisy_label_fraction:
    fraction, seed = config.noisy_label_fraction, config.seed
    y_train, _ = datasets.noisy_labels(y_train, fraction, num_classes, seed)
    if validation is not None:
      x_val, y_val = validation
      y_val, _ = datasets.noisy_labels(y_val, fraction, num_classes, seed + 1)
      validation = (x_val, y_val)
  return {
      "train": (x_train, y_train),
      "validation": validation,
      "test": (x_test, y_test),
  }


def shardable(dataset):
  """Lets multi-worker training shard an in-memory data set by example."""
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA
  )
  return dataset.with_options(options)


def numpy_data(splits, config, augment=None, num_classes=datasets.NUM_CLASSES):
  """`Data` of ``load_splits``' arrays. The training examples are repeated
  before batching, as the original code: every batch is full."""

  def pipeline(split, training, start_step=0):
    x, y = split
    return shardable(
        datasets.make_tf_dataset(
            x,
            y,
            config.batch_size,
            training,
            augment=augment if training else None,
            seed=config.seed,
            repeat=training,
            start_step=start_step,
            num_classes=num_classes,
        )
    )

  validation = splits["validation"]
  return Data(
      train=lambda start_step: pipeline(splits["train"], True, start_step),
      validation=None if validation is None else pipeline(validation, False),
      test=pipeline(splits["test"], False),
      num_train_examples=len(splits["train"][1]),
      num_classes=num_classes,
  )


# ---------------------------------------------------------------------------
# Loss, optimizer, model: the one place the examples build them
# ---------------------------------------------------------------------------


# The losses on a CosineHead (configured by the loss's `head_config`) that
# replaces the logits layer: loss -> (loss class, {loss argument: setting}); a
# setting left at None gives the library's default.
_COSINE_SETTINGS = {"margin": "cosine_margin", "scale": "cosine_scale"}
_MULTIPLICATIVE_SETTINGS = {"m": "multiplicative_margin"}
COSINE_LOSSES = {
    "amsoftmax": (tlm.AMSoftmax, _COSINE_SETTINGS),
    "arcface": (tlm.ArcFace, _COSINE_SETTINGS),
    "lsoftmax": (tlm.LSoftmax, _MULTIPLICATIVE_SETTINGS),
    "sphereface": (tlm.SphereFace, _MULTIPLICATIVE_SETTINGS),
}


def annealing_lambda(config):
  """``lambda_`` of L-Softmax / SphereFace: a `tf_large_margin.LambdaDecay`, or
  the constant lambda_min when lambda_base is 0."""
  if config.lambda_base == 0:
    return config.lambda_min
  return tlm.LambdaDecay(
      config.lambda_base, config.lambda_gamma, config.lambda_power, config.lambda_min
  )


def make_margin(config):
  """The model's margin setting: Eq. 10 at the margin layers for --loss=margin
  (a `tf_large_margin.LayerMargin`), else None."""
  if config.loss != "margin":
    return None
  return tlm.LayerMargin(
      gamma=config.gamma,
      alpha_factor=config.alpha_factor,
      top_k=config.top_k,
      worst_case_loss=config.worst_case_loss,
      dist_norm=config.dist_norm,
      epsilon=config.margin_epsilon,
      score=config.margin_score,
  )


def make_loss(config):
  """The compiled loss of ``config`` (for --loss=margin the cross-entropy with
  weight xent_weight, or None: the margin is the model's, see `make_margin`)."""
  if config.loss == "xent":
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if config.loss in ("hinge", "jacobian"):
    return tlm.MulticlassHinge(cross_entropy_weight=config.xent_weight)
  if config.loss in COSINE_LOSSES:
    loss, arguments = COSINE_LOSSES[config.loss]
    values = {name: getattr(config, setting) for name, setting in arguments.items()}
    kwargs = {name: v for name, v in values.items() if v is not None}
    if issubclass(loss, tlm.LSoftmax):
      kwargs["lambda_"] = annealing_lambda(config)
    return loss(**kwargs)
  if config.xent_weight:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  return None


def learning_rate(config, train_steps):
  """The learning rate schedule of ``config`` over ``train_steps`` steps."""
  if config.lr_schedule == "constant":
    return config.learning_rate
  if config.lr_schedule == "exponential":
    return keras.optimizers.schedules.ExponentialDecay(
        config.learning_rate,
        config.lr_decay_steps,
        config.lr_decay_rate,
        staircase=True,
    )
  boundaries = [int(f * train_steps) for f in config.lr_boundaries]
  values = [
      config.learning_rate * config.lr_decay_rate**i
      for i in range(len(boundaries) + 1)
  ]
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(config, train_steps):
  """The optimizer with its learning rate schedule and gradient clipping."""
  kwargs = dict(
      learning_rate=learning_rate(config, train_steps),
      global_clipnorm=config.clip_norm or None,
  )
  if config.optimizer == "momentum":
    return keras.optimizers.SGD(momentum=config.momentum, **kwargs)
  if config.optimizer == "adam":
    return keras.optimizers.Adam(epsilon=config.optimizer_epsilon, **kwargs)
  rmsprop = (
      RMSpropTF1 if config.optimizer == "rmsprop_tf1" else keras.optimizers.RMSprop
  )
  return rmsprop(momentum=config.momentum, epsilon=config.optimizer_epsilon, **kwargs)


def margin_layer_names(config, all_layers):
  """The margin layers, with 'all' expanded to ``all_layers``."""
  names = list(config.margin_layers)
  if ALL in names:
    if names != [ALL]:
      raise ValueError(f"--margin_layers=all cannot be combined with names: {names}")
    return list(all_layers)
  return names


def wrap_network(config, network, all_margin_layers):
  """The model the loss trains: a MarginModel around ``network`` (logits output;
  with the margin setting of `make_margin`), a JacobianModel (features = the
  input of the last layer), or, for the cosine losses, a MarginModel whose last
  layer is replaced by the `CosineHead` the loss expects (for L-Softmax /
  SphereFace its output is [cos, scale], 2C columns)."""
  if config.loss == "jacobian":
    return tlm.JacobianModel(
        network.inputs,
        network.outputs[0],
        feature_layer=network.layers[-2].name,
        jacobian_weight=config.jacobian_weight,
        variant=config.jacobian_variant,
        seed=config.seed,
    )
  if config.loss in COSINE_LOSSES:
    head = network.layers[-1]
    loss = COSINE_LOSSES[config.loss][0]
    outputs = tlm.CosineHead(
        head.units, name=f"{head.name}_cosine", **loss.head_config
    )(head.input)
    network = keras.Model(network.inputs, outputs, name=network.name)
  return tlm.MarginModel.from_model(
      network,
      margin_layers=margin_layer_names(config, all_margin_layers),
      layers_weights=None if config.layers_weights == "none" else config.layers_weights,
      margin=make_margin(config),
  )


def build_model(config, network, all_margin_layers, train_steps):
  """Wraps ``network`` (logits output) as the loss needs (`wrap_network`) and
  compiles it with the loss, optimizer and weight decay of ``config`` (call under
  the strategy's scope)."""
  model = wrap_network(config, network, all_margin_layers)
  if config.weight_decay:
    apply_weight_decay(model, config.weight_decay)
  loss = make_loss(config)
  model.compile(
      make_optimizer(config, train_steps),
      loss=loss,
      loss_weights=config.xent_weight if config.loss == "margin" and loss else None,
      metrics=[tlm.layers.accuracy_metric(model)],
  )
  return model


def check_outputs(network, num_classes):
  """Raises ValueError unless ``network`` has one logit per class of the data."""
  outputs = network.outputs[0].shape[-1]
  if outputs != num_classes:
    raise ValueError(
        f"The network has {outputs} outputs but the data have {num_classes} "
        f"classes (labels 0..{num_classes - 1})."
    )


# ---------------------------------------------------------------------------
# Training and results
# ---------------------------------------------------------------------------


def train_and_evaluate(config, strategy, build_network, all_margin_layers, data):
  """Trains the network with ``config``, evaluates it, writes the results.

  Args:
    config: a `config.RunConfig`.
    strategy: from `make_strategy`.
    build_network: () -> functional Keras model with logits output (called under
      the strategy's scope).
    all_margin_layers: what margin_layers "all" means for this network.
    data: a `Data` (e.g. from `numpy_data`).

  Returns:
    (results, model): the results dict (also written to
    <model_dir>/results.json on the chief) and the trained model (saved as
    <model_dir>/model.keras; with a validation split the returned model holds the
    best-on-validation weights).
  """
  loops, steps_per_loop = training.schedule(config, data.num_train_examples)
  directory = output_dir(config)
  os.makedirs(directory, exist_ok=True)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    network = build_network()
    check_outputs(network, data.num_classes)
    model = build_model(config, network, all_margin_layers, loops * steps_per_loop)
  progress = None
  if config.verbose:
    progress = training.LoopProgress(
        loops,
        steps_per_loop,
        config.epochs > 0,
        config.batch_size,
        data.num_train_examples,
    )
  has_validation = data.validation is not None
  monitors = []
  if getattr(model, "margin", None) is not None:
    monitors.append(tlm.monitor.MarginActivity(*first_examples(data.train(0), 1000)))
  callbacks = training.make_callbacks(directory, has_validation, progress, monitors)
  checkpoints = training.Checkpoints(
      os.path.join(directory, training.CHECKPOINT_DIR), config.checkpoint_steps
  )
  start = time.time()
  with strategy.scope():
    start_step = training.fit(
        model,
        data.train,
        loops,
        steps_per_loop,
        checkpoints,
        callbacks,
        validation_data=data.validation,
        verbose=config.verbose,
    )
  history = training.read_history(os.path.join(directory, "history.csv"))
  results = {
      "flags": config_lib.script_flags(),
      "config": config.to_json(),
      "train_steps": loops * steps_per_loop,
      "resumed_at_step": start_step,
      "num_train_examples": data.num_train_examples,
      "num_replicas": strategy.num_replicas_in_sync,
      "train_seconds_this_run": time.time() - start,
      "test_accuracy": model.evaluate(data.test, verbose=0, return_dict=True)[
          "accuracy"
      ],
      "history": [
          dict(row, step=(int(row["epoch"]) + 1) * steps_per_loop)
          for row in history
      ],
  }
  model.save(os.path.join(directory, "model.keras"))
  if data.validation is not None:
    results.update(best_on_validation(model, results["history"], directory, data.test))
  if is_chief():
    with open(os.path.join(directory, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  # Only now: a run killed before its results were written resumes at the end.
  checkpoints.remove()
  logging.info("Results in %s", directory)
  print(f"clean test accuracy: {results['test_accuracy']:.4f}")
  return results, model


def first_examples(dataset, count):
  """(x, y) numpy arrays of the first ``count`` examples of a batched data set."""
  xs, ys = [], []
  for x, y in dataset:
    xs.append(x.numpy())
    ys.append(y.numpy())
    if sum(len(y) for y in ys) >= count:
      break
  return np.concatenate(xs)[:count], np.concatenate(ys)[:count]


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
