"""Margin methods side by side in the small-data regime of Sokolic et al.

MNIST with a few thousand training examples, the 2-layer CNN of Sokolic et al.
("Robust Large Margin Deep Neural Networks", 2017: (32,5,5)-conv, 2x2 max-pool,
(32,5,5)-conv, 2x2 max-pool, linear classifier), one run per method and training-set
size, at the same budget. Writes `comparison.md` (test accuracy and the median
input-space margin of correctly classified test images: first-order l2 and
DeepFool l2) and `comparison.json` to --out_dir.

  python examples/compare_methods.py --data_source=/path/to/mnist \\
      --train_sizes=5000,20000 --train_steps=2000

Methods: weight decay (xent + weight decay), hinge (Crammer-Singer + weight
decay), jacobian (hinge + Jacobian regulariser, Sokolic et al. Eq. 26), margin
(Eq. 10 at the input, l2, + xent), amsoftmax, arcface, lsoftmax (m = 2),
sphereface (m = 4) (on the `CosineHead` each loss expects; all with weight decay).
L-Softmax and SphereFace anneal their target logit as in the papers,
scale * (lambda cos + psi) / (1 + lambda) with lambda = max(lambda_min,
lambda_base * (1 + lambda_gamma * step)^(-lambda_power)) (--lambda_* flags,
SphereFace's values by default; --lambda_base=0 --lambda_min=0: no annealing).
Accuracy and margins of lsoftmax / sphereface are those of their logits
cos * scale (`tf_large_margin.layers`).
"""

import json
import os
import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import datasets
from tf_large_margin import margin_estimation
from tf_large_margin import regularizers

import lambda_flags

METHODS = (
    "weight_decay",
    "hinge",
    "jacobian",
    "margin",
    "amsoftmax",
    "arcface",
    "lsoftmax",
    "sphereface",
)

flags.DEFINE_string("data_source", None, "MNIST source (default: the embedded sample).")
flags.DEFINE_list(
    "train_sizes", ["5000", "20000"], "Class-balanced training set sizes."
)
flags.DEFINE_list("methods", list(METHODS), f"Methods among {METHODS}.")
flags.DEFINE_integer("train_steps", 2000, "Training steps per run.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay rate (all methods).")
flags.DEFINE_float("jacobian_weight", 0.1, "Jacobian regulariser weight lambda.")
flags.DEFINE_float(
    "gamma", 2.0, "Eq. 10 margin gamma at the input (l2, pixels in [0, 1])."
)
flags.DEFINE_integer("num_test", 10000, "Test images evaluated (accuracy).")
flags.DEFINE_integer("num_margin", 1000, "Test images whose margins are estimated.")
flags.DEFINE_integer("seed", 0, "Seed of the subset, initialisation and shuffling.")
flags.DEFINE_string("out_dir", "/tmp/tf_large_margin_comparison", "Output directory.")
FLAGS = flags.FLAGS


def sokolic_cnn(head_config=None):
  """The CNN of Sokolic et al.; the classifier is linear or, given its arguments
  ``head_config``, a `CosineHead`."""
  inputs = keras.Input((28, 28, 1), name="image")
  h = inputs
  for i in range(2):
    h = keras.layers.Conv2D(32, 5, padding="same", activation="relu", name=f"conv{i}")(
        h
    )
    h = keras.layers.MaxPooling2D(2)(h)
  features = keras.layers.Flatten(name="features")(h)
  head = (
      keras.layers.Dense(10, name="head")
      if head_config is None
      else tlm.CosineHead(10, name="head", **head_config)
  )
  return inputs, head(features)


def build(method):
  """The compiled model of one method."""
  keras.utils.set_random_seed(FLAGS.seed)
  hinge = tlm.MulticlassHinge("crammer_singer", margin=1.0)
  loss = {
      "weight_decay": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      "hinge": hinge,
      "jacobian": hinge,
      "margin": tlm.LargeMarginLoss(
          gamma=FLAGS.gamma, dist_norm=2, cross_entropy_weight=1.0
      ),
      "amsoftmax": tlm.AMSoftmax(margin=0.35, scale=30.0),
      "arcface": tlm.ArcFace(margin=0.5, scale=30.0),
      "lsoftmax": tlm.LSoftmax(m=2, lambda_=lambda_flags.annealing_lambda()),
      "sphereface": tlm.SphereFace(m=4, lambda_=lambda_flags.annealing_lambda()),
  }[method]
  inputs, outputs = sokolic_cnn(getattr(loss, "head_config", None))
  if method == "jacobian":
    model = tlm.JacobianModel(
        inputs,
        outputs,
        feature_layer="features",
        jacobian_weight=FLAGS.jacobian_weight,
        seed=FLAGS.seed,
    )
  else:
    model = tlm.MarginModel(inputs, outputs, margin_layers=["input"])
  regularizers.apply_weight_decay(model, FLAGS.weight_decay)
  model.compile(
      keras.optimizers.Adam(FLAGS.learning_rate),
      loss=loss,
      metrics=[tlm.layers.accuracy_metric(model)],
  )
  return model


def input_margins(model, x, y):
  """Median first-order and DeepFool l2 input margins of correct test images."""
  first_order, correct = margin_estimation.first_order_margins(model, x, y, dist_norm=2)
  _, deepfool = margin_estimation.deepfool(model, x, y, norm=2)
  return (
      float(np.median(first_order["input"][correct])),
      float(np.median(deepfool[correct])),
  )


def run(method, train, x_test, y_test):
  model = build(method)
  start = time.time()
  steps_per_epoch = min(FLAGS.train_steps, len(train[0]) // FLAGS.batch_size)
  dataset = datasets.make_tf_dataset(
      *train, FLAGS.batch_size, training=True, seed=FLAGS.seed
  ).repeat()
  model.fit(
      dataset,
      epochs=FLAGS.train_steps // steps_per_epoch,
      steps_per_epoch=steps_per_epoch,
      verbose=0,
      callbacks=[tlm.LambdaScheduler()],  # lsoftmax / sphereface annealing
  )
  seconds = time.time() - start
  test = datasets.make_tf_dataset(x_test, y_test, 500, training=False)
  accuracy = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
  x_margin = x_test[: FLAGS.num_margin].astype("float32") / 255.0
  first_order, deepfool = input_margins(
      tlm.layers.logits_model(model), x_margin, y_test[: FLAGS.num_margin]
  )
  return dict(
      method=method,
      accuracy=float(accuracy),
      first_order_l2=first_order,
      deepfool_l2=deepfool,
      train_seconds=seconds,
  )


def markdown(rows):
  lines = [
      "| train size | method | test accuracy | median first-order l2 margin | "
      "median DeepFool l2 margin | train time (s) |",
      "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['train_size']} | {r['method']} | {100 * r['accuracy']:.2f} % | "
        f"{r['first_order_l2']:.3f} | {r['deepfool_l2']:.3f} | "
        f"{r['train_seconds']:.0f} |"
    )
  return "\n".join(lines) + "\n"


def main(_):
  unknown = set(FLAGS.methods) - set(METHODS)
  if unknown:
    raise ValueError(f"Unknown methods {sorted(unknown)}; choose among {METHODS}.")
  x_train, y_train, x_test, y_test = datasets.load_dataset("mnist", FLAGS.data_source)
  x_test, y_test = x_test[: FLAGS.num_test], y_test[: FLAGS.num_test]
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  rows = []
  for size in map(int, FLAGS.train_sizes):
    train = datasets.balanced_subset(
        x_train, y_train, size, datasets.NUM_CLASSES, FLAGS.seed
    )
    for method in FLAGS.methods:
      row = dict(train_size=size, **run(method, train, x_test, y_test))
      print(json.dumps(row), flush=True)
      rows.append(row)
  with open(os.path.join(FLAGS.out_dir, "comparison.json"), "w") as f:
    json.dump(
        dict(
            flags={
                k: FLAGS[k].value
                for k in (
                    "data_source",
                    "train_sizes",
                    "train_steps",
                    "batch_size",
                    "learning_rate",
                    "weight_decay",
                    "jacobian_weight",
                    "gamma",
                    "lambda_base",
                    "lambda_gamma",
                    "lambda_power",
                    "lambda_min",
                    "seed",
                )
            },
            rows=rows,
        ),
        f,
        indent=1,
    )
  with open(os.path.join(FLAGS.out_dir, "comparison.md"), "w") as f:
    f.write(markdown(rows))
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
