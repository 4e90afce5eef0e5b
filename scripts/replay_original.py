r"""Replays the original code's MNIST training with the project, against its golden trajectory.

  python scripts/replay_original.py \
      --golden_dir=../shared/data/original_mnist_trajectory \
      --mnist_dir=../shared/data/mnist --output=results/original_replay.json

The golden folder holds what google-research `large_margin` (TF1 graph mode)
computed on real MNIST: initial variables, the batch order, per-step losses and
gradient norms for 600 steps, snapshots after steps 1, 10 and 100, and test
accuracies every 100 steps. This script runs `original_recipe.compile_mnist`:

1. teacher-forced single steps: variables, batch-norm statistics and rms slots
   from the snapshot after step t (t = 0, 1, 10, 100), then step t + 1 on the
   golden batch, compared with the golden trace (loss, per-layer margin loss,
   gradient norm, cross-entropy and accuracy of the batch);
2. inference-mode test accuracy from the initial and step-100 variables;
3. free-running training from the golden initial variables on the golden batch
   order (--steps, default 600): per-step loss and test accuracy every 100 steps
   beside the golden ones (after ~3 steps the run is chaotic: compare ranges);
4. --seeds: the same from the project's own seeded initialisation (the original's
   range over seeds, not its trajectory). Seed 0 is the original's initialisation:
   `keras.utils.set_random_seed(0)` gives `mnist_cnn` the original's initial
   variables bit for bit (checked at start).

The results file is rewritten after every run.
"""

import json
import os
import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import datasets
from tf_large_margin import original_recipe

flags.DEFINE_string("golden_dir", "../shared/data/original_mnist_trajectory", "Golden.")
flags.DEFINE_string("mnist_dir", "../shared/data/mnist", "Full MNIST (IDX gz files).")
flags.DEFINE_integer("steps", 600, "Free-running steps (multiple of 100).")
flags.DEFINE_bool(
    "golden_init",
    True,
    "Train from the original's initial variables (the same as --seeds=0: "
    "keras.utils.set_random_seed(0) gives mnist_cnn the original's initial "
    "variables bit for bit).",
)
flags.DEFINE_list("seeds", [], "Also train from the project's init with these seeds.")
flags.DEFINE_string("output", "results/original_replay.json", "Results file.")
FLAGS = flags.FLAGS

EVAL_EVERY = 100


def golden(name):
  return dict(np.load(os.path.join(FLAGS.golden_dir, name)))


def batch(x, y, indices):
  return x[indices].astype(np.float32) / np.float32(255.0), y[indices]


def teacher_forced(trace, x, y):
  """One step from each snapshot, beside the golden trace row of that step."""
  rows = []
  for t, name in [
      (0, "init_weights.npz"),
      (1, "weights_step1.npz"),
      (10, "weights_step10.npz"),
      (100, "weights_step100.npz"),
  ]:
    model = original_recipe.compile_mnist()
    state = {k: v for k, v in golden(name).items() if not k.startswith("momentum/")}
    original_recipe.set_variables(model, state)
    model.optimizer.iterations.assign(t)
    images, labels = batch(x, y, trace["batch_indices"][t])
    report = original_recipe.step_report(model, images, labels)
    logits = report["logits"]
    xent = float(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    )
    row = {
        "step": t + 1,
        "total_loss": [report["total_loss"], float(trace["total_loss"][t])],
        "margin_loss_per_layer": [
            report["margin_loss_per_layer"].tolist(),
            trace["margin_loss_per_layer"][t].tolist(),
        ],
        "global_grad_norm": [
            report["global_grad_norm"],
            float(trace["global_grad_norm"][t]),
        ],
        "xent": [xent, float(trace["xent_loss"][t])],
        "train_acc": [
            float(np.mean(np.argmax(logits, 1) == labels)),
            float(trace["train_acc"][t]),
        ],
    }
    rows.append(row)
    print(
        f"step {t + 1:4d} from snapshot {t}: "
        + "  ".join(f"{k} ours/original {row[k]}" for k in row if k != "step")
    )
  return rows


def test_accuracy(model, x_test, y_test):
  return float(
      model.evaluate(
          x_test.astype(np.float32) / np.float32(255.0),
          y_test,
          batch_size=1000,
          verbose=0,
          return_dict=True,
      )["accuracy"]
  )


def train(model, x, y, batch_indices, x_test, y_test, steps):
  """Free-running training on ``batch_indices``; per-step losses, test accuracy."""
  losses, accuracies = [], {0: test_accuracy(model, x_test, y_test)}

  class StepLosses(keras.callbacks.Callback):
    """Per-step loss from Keras' running mean over the loop."""

    def on_epoch_begin(self, epoch, logs=None):
      self.previous = 0.0

    def on_train_batch_end(self, step, logs=None):
      mean = float(logs["loss"])
      losses.append((step + 1) * mean - step * self.previous)
      self.previous = mean

  for end in range(EVAL_EVERY, steps + 1, EVAL_EVERY):
    images, labels = batch(x, y, batch_indices[end - EVAL_EVERY : end].ravel())
    model.fit(
        images,
        labels,
        batch_size=batch_indices.shape[1],
        shuffle=False,
        epochs=1,
        verbose=0,
        callbacks=[StepLosses()],
    )
    accuracies[end] = test_accuracy(model, x_test, y_test)
    print(f"  step {end}: test accuracy {accuracies[end]:.4f}", flush=True)
  return losses, accuracies


def write(results):
  os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
  with open(FLAGS.output, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)


def main(_):
  x, y, x_test, y_test = datasets.load_mnist_directory(FLAGS.mnist_dir)
  y = y.astype(np.int64)
  trace = golden("trace.npz")
  results = {"teacher_forced": teacher_forced(trace, x, y)}

  model = original_recipe.compile_mnist()
  golden_test = dict(zip(trace["eval_step"].tolist(), trace["test_acc"].tolist()))
  for t, name in [(100, "weights_step100.npz")]:
    original_recipe.set_variables(
        model, {k: v for k, v in golden(name).items() if not k.startswith("rms/")}
    )
    results[f"test_accuracy_from_snapshot_{t}"] = [
        test_accuracy(model, x_test, y_test),
        golden_test[t],
    ]
    print(f"test accuracy from the step-{t} snapshot: {results[f'test_accuracy_from_snapshot_{t}']}")

  results["golden"] = {
      "loss": trace["total_loss"][: FLAGS.steps].tolist(),
      "test_accuracy": golden_test,
  }
  runs = results["free_running"] = {}
  starts = [("golden_init", None)] if FLAGS.golden_init else []
  starts += [(f"seed_{s}", int(s)) for s in FLAGS.seeds]
  for label, seed in starts:
    start = time.time()
    if seed is not None:
      keras.utils.set_random_seed(seed)
    model = original_recipe.compile_mnist()
    if seed == 0:
      init = golden("init_weights.npz")
      results["seed_0_is_the_original_init"] = all(
          np.array_equal(value, init[role])
          for role, value in original_recipe.variables(model, slots=False).items()
      )
    if seed is None:
      original_recipe.set_variables(
          model,
          {
              k: v
              for k, v in golden("init_weights.npz").items()
              if not k.startswith("rms/")
          },
      )
    print(f"{label}: training {FLAGS.steps} steps")
    losses, accuracies = train(
        model, x, y, trace["batch_indices"], x_test, y_test, FLAGS.steps
    )
    runs[label] = {
        "loss": losses,
        "test_accuracy": accuracies,
        "seconds": time.time() - start,
    }
    write(results)  # after every run: a long replay keeps what it finished
  write(results)
  print("\ntest accuracy every 100 steps")
  print("run          " + " ".join(f"{s:>7d}" for s in sorted(golden_test)))
  print("original     " + " ".join(f"{golden_test[s]:7.4f}" for s in sorted(golden_test)))
  for label, run in runs.items():
    acc = run["test_accuracy"]
    print(f"{label:12s} " + " ".join(f"{acc[s]:7.4f}" for s in sorted(acc)))


if __name__ == "__main__":
  app.run(main)
