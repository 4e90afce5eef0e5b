"""Margin methods side by side in the small-data regime of Sokolic et al.

MNIST with a few thousand training examples, the 2-layer CNN of Sokolic et al.
("Robust Large Margin Deep Neural Networks", 2017: (32,5,5)-conv, 2x2 max-pool,
(32,5,5)-conv, 2x2 max-pool, linear classifier), one run per method and training-set
size, at the same budget. Writes `comparison.md` (test accuracy and the median
input-space margin of correctly classified test images: first-order l2 and
DeepFool l2) and `comparison.json` to --out_dir; each run's outputs (model,
logs, results.json: see runner.py) are in <out_dir>/runs/<size>_<method>.

  python examples/compare_methods.py --data_source=/path/to/mnist \\
      --train_sizes=5000,20000 --train_steps=2000

Methods: weight decay (xent + weight decay), hinge (Crammer-Singer + weight
decay), jacobian (hinge + Jacobian regulariser, Sokolic et al. Eq. 26), margin
(Eq. 10 at the input, l2, + xent), amsoftmax, arcface, lsoftmax (m = 2),
sphereface (m = 4) (on the `CosineHead` each loss expects; all with weight decay,
Adam at a constant learning rate, batches repeated before batching as mnist.py).
Every run is built and trained by the examples' runner (runner.py).
L-Softmax and SphereFace anneal their target logit as in the papers,
scale * (lambda cos + psi) / (1 + lambda) with lambda = max(lambda_min,
lambda_base * (1 + lambda_gamma * step)^(-lambda_power)) (--lambda_* flags,
SphereFace's values by default; --lambda_base=0 --lambda_min=0: no annealing).
Accuracy and margins of lsoftmax / sphereface are those of their logits
cos * scale (`tf_large_margin.layers`).
"""

import json
import os

from absl import app
from absl import flags
import keras
import numpy as np

import tf_large_margin as tlm
from tf_large_margin import margin_estimation

import config as config_lib
import runner

# The RunConfig of each method (on top of the shared settings below).
METHODS = {
    "weight_decay": dict(loss="xent"),
    "hinge": dict(loss="hinge"),
    "jacobian": dict(loss="jacobian"),
    "margin": dict(loss="margin", dist_norm=2, xent_weight=1.0),
    "amsoftmax": dict(loss="amsoftmax", cosine_margin=0.35, cosine_scale=30.0),
    "arcface": dict(loss="arcface", cosine_margin=0.5, cosine_scale=30.0),
    "lsoftmax": dict(loss="lsoftmax", multiplicative_margin=2),
    "sphereface": dict(loss="sphereface", multiplicative_margin=4),
}

# Settings every method shares; those in FLAG_NAMES are flags.
SHARED = dict(
    data_source="embedded",
    train_steps=2000,
    batch_size=64,
    optimizer="adam",
    learning_rate=1e-3,
    optimizer_epsilon=1e-7,
    lr_schedule="constant",
    clip_norm=0.0,
    weight_decay=5e-4,
    jacobian_weight=0.1,
    gamma=2.0,
    margin_layers=["input"],
    layers_weights="none",
    verbose=0,
)
FLAG_NAMES = (
    "data_source",
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
config_lib.define_flags(
    SHARED,
    names=FLAG_NAMES,
    helps=dict(
        data_source="MNIST source: 'embedded' (the sample shipped with the "
        "package), 'tfds' or a directory with the IDX files.",
        train_steps="Training steps per run.",
        batch_size="Batch size.",
        learning_rate="Adam learning rate.",
        weight_decay="Weight decay rate (all methods).",
        jacobian_weight="Jacobian regulariser weight lambda.",
        gamma="Eq. 10 margin gamma at the input (l2, pixels in [0, 1]).",
        seed="Seed of the subset, initialisation and data order.",
    ),
)
flags.DEFINE_list(
    "train_sizes", ["5000", "20000"], "Class-balanced training set sizes."
)
flags.DEFINE_list("methods", list(METHODS), f"Methods among {', '.join(METHODS)}.")
flags.DEFINE_integer("num_test", 10000, "Test images evaluated (accuracy).")
flags.DEFINE_integer("num_margin", 1000, "Test images whose margins are estimated.")
flags.DEFINE_string("out_dir", "/tmp/tf_large_margin_comparison", "Output directory.")
FLAGS = flags.FLAGS


def run_config():
  """The `config.RunConfig` the methods share (one loop per run)."""
  config = config_lib.from_flags()
  return config.replace(steps_per_loop=config.train_steps)


def method_config(base, method, size):
  """The `config.RunConfig` of one method at one training-set size."""
  return base.replace(
      num_train_examples=size,
      model_dir=os.path.join(FLAGS.out_dir, "runs", f"{size}_{method}"),
      **METHODS[method],
  )


def sokolic_cnn():
  """The CNN of Sokolic et al. with a linear classifier "head" (the runner
  replaces it by the `CosineHead` of the cosine losses)."""
  inputs = keras.Input((28, 28, 1), name="image")
  h = inputs
  for i in range(2):
    h = keras.layers.Conv2D(32, 5, padding="same", activation="relu", name=f"conv{i}")(
        h
    )
    h = keras.layers.MaxPooling2D(2)(h)
  features = keras.layers.Flatten(name="features")(h)
  return keras.Model(inputs, keras.layers.Dense(10, name="head")(features))


def input_margins(model, x, y):
  """Median first-order and DeepFool l2 input margins of correct test images."""
  first_order, correct = margin_estimation.first_order_margins(model, x, y, dist_norm=2)
  _, deepfool = margin_estimation.deepfool(model, x, y, norm=2)
  return (
      float(np.median(first_order["input"][correct])),
      float(np.median(deepfool[correct])),
  )


def run(config, method, strategy):
  """Trains and evaluates one method; returns its row of the comparison."""
  splits = runner.load_splits("mnist", config)
  x_test, y_test = splits["test"]
  splits["test"] = (x_test[: FLAGS.num_test], y_test[: FLAGS.num_test])
  results, model = runner.train_and_evaluate(
      config, strategy, sokolic_cnn, ["input"], runner.numpy_data(splits, config)
  )
  x_margin = x_test[: FLAGS.num_margin].astype("float32") / 255.0
  first_order, deepfool = input_margins(
      tlm.layers.logits_model(model), x_margin, y_test[: FLAGS.num_margin]
  )
  return dict(
      method=method,
      accuracy=float(results["test_accuracy"]),
      first_order_l2=first_order,
      deepfool_l2=deepfool,
      train_seconds=results["train_seconds_this_run"],
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
    raise ValueError(
        f"Unknown methods {sorted(unknown)}; choose among {tuple(METHODS)}."
    )
  base = run_config()
  strategy = runner.make_strategy(base)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  rows = []
  for size in map(int, FLAGS.train_sizes):
    for method in FLAGS.methods:
      config = method_config(base, method, size)
      row = dict(train_size=size, **run(config, method, strategy))
      print(json.dumps(row), flush=True)
      rows.append(row)
  with open(os.path.join(FLAGS.out_dir, "comparison.json"), "w") as f:
    json.dump(dict(flags=config_lib.script_flags(), rows=rows), f, indent=1)
  with open(os.path.join(FLAGS.out_dir, "comparison.md"), "w") as f:
    f.write(markdown(rows))
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
