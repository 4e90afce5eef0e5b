r"""The paper's MNIST sweeps at a chosen budget: noisy labels and small training sets.

  python examples/reproduce_mnist.py --data_source=/path/to/mnist_idx_dir \
      --out_dir=/tmp/reproduce_mnist

Every point is one `examples/mnist.py` run (paper CNN, Adam, margin runs add the
cross-entropy with --xent_weight, as the paper's margin models) on a 55k/5k
train/validation split of the training set; the reported number is the clean
test accuracy of the checkpoint with the best validation accuracy (model
selection, as the paper). With noisy labels the validation labels are noisy too:
selection uses only what a practitioner has.

1. search: for each distance norm, the margin runs at --search_noise with each
   (gamma, alpha_factor) of --search_grid; the pair with the best validation
   accuracy is used for every later margin run of that norm. Gamma is in the units
   of the input (images in [0, 1]), where the margin is enforced. alpha_factor 1
   clips the loss of misclassified examples (d < 0) to a constant: wrongly
   labelled examples then give no gradient.
2. (a) noisy labels: xent and the margin with each norm at each --noise_fractions.
3. (b) training-set size: xent and the margin with --size_norm at each
   --train_sizes (class-balanced subsets; the full 55k is the 0 % noise point).

Writes <out_dir>/results.md (tables) and <out_dir>/results.png (plots); runs that
finished (runs/<name>/results.json) are reused, so an interrupted sweep continues.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

import config as config_lib

# The mnist.py settings shared by every run of the sweep (flags of this script).
SHARED = dict(
    data_source="embedded",
    train_steps=500,
    steps_per_loop=100,
    batch_size=128,
    num_validation=5000,
    learning_rate=1e-3,
    xent_weight=1.0,
)
config_lib.define_flags(
    SHARED,
    names=SHARED,
    helps=dict(
        data_source="As mnist.py's --data_source.",
        train_steps="Steps of each sweep run.",
        steps_per_loop="Steps between validation checks.",
        batch_size="Batch size.",
        num_validation="Validation examples (paper: 5000).",
        learning_rate="Adam learning rate.",
        xent_weight="Cross-entropy weight of the margin runs.",
    ),
)
# Everything the sweep does not vary is set here, not left to mnist.py's defaults
# (which are the original configuration's).
FIXED = dict(
    optimizer="adam",
    optimizer_epsilon=1e-7,
    lr_schedule="constant",
    weight_decay=0,
    layers_weights="none",
    verbose=2,
)
flags.DEFINE_string("out_dir", "/tmp/reproduce_mnist", "Output directory.")
flags.DEFINE_integer("search_steps", 300, "Steps of each gamma-search run.")
flags.DEFINE_list("norms", list(config_lib.NORMS), "Distance norms of the margin runs.")
flags.DEFINE_string(
    "search_grid",
    "1:3,10,30,10/1;2:0.5,2,8,2/1;inf:0.05,0.2,0.8,0.2/1",
    "(gamma, alpha_factor) pairs tried per norm: "
    "'norm:gamma[/alpha],...;norm:...' (alpha_factor default 4).",
)
flags.DEFINE_float("search_noise", 0.8, "Noisy-label fraction of the gamma search.")
flags.DEFINE_list(
    "noise_fractions",
    ["0", "0.2", "0.4", "0.6", "0.8"],
    "Noisy-label fractions of sweep (a).",
)
flags.DEFINE_list(
    "train_sizes",
    ["68", "550", "5500"],
    "Training-set sizes of sweep (b) besides the full training set.",
)
flags.DEFINE_enum(
    "size_norm", "inf", config_lib.NORMS, "Norm of the margin runs of sweep (b)."
)
FLAGS = flags.FLAGS

MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist.py")
FULL = "full"
DEFAULT_ALPHA_FACTOR = 4.0
# Test accuracy of the checkpoint with the best validation accuracy.
SELECTED = "best_validation_test_accuracy"


def parse_search_grid(text):
  """'1:3,10/1;inf:0.1' -> {'1': [(3., 4.), (10., 1.)], 'inf': [(0.1, 4.)]}."""
  grid = {}
  for item in text.split(";"):
    norm, _, candidates = item.partition(":")
    if not candidates:
      raise ValueError(f"--search_grid item {item!r} is not 'norm:gamma[/alpha],...'.")
    grid[norm.strip()] = [
        (float(gamma), float(alpha or DEFAULT_ALPHA_FACTOR))
        for gamma, _, alpha in (c.partition("/") for c in candidates.split(","))
    ]
  return grid


def run_name(*run_flags):
  """A directory name from mnist.py flags: 'loss=xent_noisy_label_fraction=0.4'."""
  return "_".join(f.lstrip("-").replace(",", "+") for f in run_flags)


def run(name, steps, *extra_flags):
  """Runs mnist.py once (unless it already finished); returns its results."""
  model_dir = os.path.join(FLAGS.out_dir, "runs", name)
  results_path = os.path.join(model_dir, "results.json")
  if not os.path.exists(results_path):
    os.makedirs(model_dir, exist_ok=True)
    shared = {s: FLAGS[s].value for s in SHARED if s != "xent_weight"}
    command = [
        sys.executable,
        MNIST,
        f"--model_dir={model_dir}",
        *config_lib.to_argv(dict(shared, train_steps=steps, **FIXED)),
        *extra_flags,
    ]
    start = time.time()
    with open(os.path.join(model_dir, "log.txt"), "a", encoding="utf-8") as log:
      subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    logging.info("%s: %.0f s", name, time.time() - start)
  with open(results_path, encoding="utf-8") as f:
    return json.load(f)


def margin_flags(norm, gamma, alpha_factor):
  return [
      "--loss=margin",
      f"--dist_norm={norm}",
      f"--gamma={gamma}",
      f"--alpha_factor={alpha_factor}",
      f"--xent_weight={FLAGS.xent_weight}",
      "--margin_layers=input",
  ]


def search(grid):
  """{norm: (gamma, alpha_factor) with the best validation accuracy at
  --search_noise}."""
  chosen = {}
  for norm in FLAGS.norms:
    scores = {}
    for gamma, alpha_factor in grid[norm]:
      run_flags = [
          f"--noisy_label_fraction={FLAGS.search_noise}",
          *margin_flags(norm, gamma, alpha_factor),
      ]
      scores[gamma, alpha_factor] = run(
          "search_" + run_name(*run_flags), FLAGS.search_steps, *run_flags
      )["best_validation_accuracy"]
    chosen[norm] = max(scores, key=scores.get)
    logging.info(
        "l%s: validation accuracy per (gamma, alpha_factor) %s -> %s",
        norm,
        scores,
        chosen[norm],
    )
  return chosen


def methods(norms, chosen):
  """{column name: mnist.py flags} of xent and the margin with each norm."""
  columns = {"xent": ["--loss=xent"]}
  for norm in norms:
    columns[f"margin l{norm}"] = margin_flags(norm, *chosen[norm])
  return columns


def point_run(column_flags, noise="0", size=FULL):
  """Results of one method at one (noise fraction, training-set size)."""
  point_flags = [f"--noisy_label_fraction={noise}"]
  if size != FULL:
    point_flags.append(f"--num_train_examples={size}")
  return run(
      run_name(*column_flags, *point_flags),
      FLAGS.train_steps,
      *point_flags,
      *column_flags,
  )


def markdown_table(title, point_name, table, point_label):
  """A markdown table of {point: {column: accuracy}} in percent."""
  columns = list(next(iter(table.values())))
  lines = [
      f"### {title}",
      "",
      "| " + " | ".join([point_name] + columns) + " |",
      "| " + " | ".join(["---"] * (len(columns) + 1)) + " |",
  ]
  for point, row in table.items():
    lines.append(
        "| "
        + " | ".join([point_label(point)] + [f"{100 * row[c]:.2f}" for c in columns])
        + " |"
    )
  return "\n".join(lines)


def plot(noise_table, size_table, path):
  """Test accuracy vs noise fraction and vs training-set size, one line per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4))
  for axis, table, xlabel in (
      (left, noise_table, "noisy-label fraction"),
      (right, size_table, "training examples"),
  ):
    points = list(table)
    for column in table[points[0]]:
      axis.plot(
          [float(p) for p in points],
          [100 * table[p][column] for p in points],
          marker="o",
          label=column,
      )
    axis.set_xlabel(xlabel)
    axis.set_ylabel("clean test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
  right.set_xscale("log")
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main(_):
  start = time.time()
  chosen = search(parse_search_grid(FLAGS.search_grid))
  noise_columns = methods(FLAGS.norms, chosen)
  noise_table = {
      noise: {c: point_run(f, noise=noise)[SELECTED] for c, f in noise_columns.items()}
      for noise in FLAGS.noise_fractions
  }
  size_table = {}
  for size in FLAGS.train_sizes + [FULL]:
    runs = {
        c: point_run(f, size=size)
        for c, f in methods([FLAGS.size_norm], chosen).items()
    }
    size_table[str(runs["xent"]["num_train_examples"])] = {
        c: results[SELECTED] for c, results in runs.items()
    }
  report = "\n\n".join(
      [
          f"(gamma, alpha_factor) chosen on validation at {FLAGS.search_noise:.0%} "
          "noisy labels: " + ", ".join(f"l{n}: {c}" for n, c in chosen.items()),
          markdown_table(
              "(a) Noisy labels: clean test accuracy (%)",
              "noisy labels",
              noise_table,
              lambda p: f"{float(p):.0%}",
          ),
          markdown_table(
              "(b) Training-set size: clean test accuracy (%)",
              "training examples",
              size_table,
              str,
          ),
          f"{FLAGS.train_steps} steps of batch {FLAGS.batch_size} per run "
          f"({FLAGS.search_steps} for the gamma search); sweep wall-clock "
          f"{(time.time() - start) / 60:.0f} min (finished runs reused).",
      ]
  )
  with open(os.path.join(FLAGS.out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(report + "\n")
  plot(noise_table, size_table, os.path.join(FLAGS.out_dir, "results.png"))
  print(report)


if __name__ == "__main__":
  app.run(main)
