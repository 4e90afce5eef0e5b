r"""The paper's MNIST experiments (Elsayed et al. 2018, Sec. 4.2), cell by cell.

  python examples/reproduce_mnist.py --task=limited_data --points=68,550 \
      --methods=xent,hinge,margin_input,margin_all --seeds=0,1,2 \
      --data_source=/path/to/mnist_idx_dir --out_dir=results/paper
  python examples/paper_report.py --out_dir=results/paper      # tables, figures

A *cell* is one training run: (task, method, point, seed, gamma). The task says
what a point is: ``limited_data`` a class-balanced training subset of that many
examples, ``noisy_labels`` that fraction of wrong training (and validation) labels.
Every cell runs `examples/mnist.py` once, on `architectures.mnist_cnn` (the
original network), with 5,000 of the 60,000 training images held out for
validation (the paper's 55k / 5k split; the subset is drawn from the 55k), and is
scored by the test accuracy of its best-on-validation checkpoint (validation every
--steps_per_loop steps). The seed fixes the split, the subset, the flipped labels,
the initialisation and the data order, so within a seed every method sees the same
data. Each finished cell appends one JSON line to ``<out_dir>/cells.jsonl`` (its
settings, accuracies and, for margin methods, the per-layer fraction of examples on
which the margin term is active, `tf_large_margin.monitor.MarginActivity`);
`paper_report.py` makes every table and figure from that file.

Methods (`METHODS`), as the paper's Sec. 4.2:
  xent, hinge        cross-entropy / multi-class hinge; SGD with momentum 0.9.
  margin_input       Eq. 10 at the input + cross-entropy (--xent_weight).
  margin_all         Eq. 10 at input, conv0, conv1, fc0 and the logits, the same
                     gamma for every layer (per-layer units: "size" weights).
  margin_all_logits  margin_all with Eq. 10 on the logits (``score="logits"``).
  xent_rmsprop       cross-entropy with the margin methods' optimizer (a control:
                     margin vs xent_rmsprop is the margin term's own effect).
  <margin>_k9        the same with all 9 other classes (top_k 9, the paper's
                     setting; the released config has 1).
  <margin>_k9sum     all 9 other classes, their penalties summed
                     (worst_case_loss=False) instead of the smallest distance's.
  <margin>_a1        alpha_factor 1 (the released config has 4): distances
                     clipped below at 0, misclassified examples add no gradient.
  <margin>_l2[_k9[sum]|_a1]  the same with l2 distances (the paper's noisy-label
                     models) and no layer weights, as the original's train.py
                     (it passes the layer sizes for linf only).
  <margin>_l1[...]   the same with l1 distances (no layer weights).
  <margin>_l2size[...]  l2 distances with the "size" weights of linf: how the
                     l2 cells were run before the original's l2 weights were
                     matched (kept so that those records name their setting).
  Margin methods use TF1 RMSProp without momentum (mnist.py's recipe).
  All: weight decay 5e-4, learning rate x0.1 at 50 % and 75 % of the steps.

Robustness (paper Fig. 3): ``--task=robustness`` evaluates the models that the
``noisy_labels`` task trained at --robustness_point (0.0: clean labels, 55k
examples), each method at its chosen gamma, with `examples/evaluate.py` on the
first --robustness_examples test images: white-box and black-box FGSM / iterative
FGSM over evaluate.py's epsilons (worst case over its attack objectives, the
softmax cross-entropy and the logit margin), certified (IBP) accuracy, the l_inf
margins and how the black-box directions meet the model (evaluate.py's transfer
analysis; `paper_report` tabulates it). The
black-box examples of seed s are crafted on the ``xent`` model of seed s + 1 (an
independently trained cross-entropy model, as the paper's transfer attacks). One
record per (method, seed) goes to the same cells.jsonl.

Gamma search: a margin cell with several --gammas first runs every gamma at
--search_seed; the gamma with the best validation accuracy is then used for the
other seeds (a cell of another seed waits for its search to finish).

Several drivers may run at once on the same --out_dir (e.g. one per core, each with
--threads=1): a cell is claimed by a file in its run directory, and a claim whose
process died is taken over (the run resumes from its checkpoint).
"""

import json
import math
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

import config as config_lib

TASKS = ("limited_data", "noisy_labels")
ROBUSTNESS = "robustness"
PAPER_EPOCHS = 200
# Gammas searched per (score, norm, layer weights). Without the "size" weights a
# distance is in the layer's own units (not divided by its size); an l1 distance
# is larger than an l2 one (the dual norm of the gradient, linf <= l2), so its
# grids are shifted up.
SEARCH_GAMMAS = {
    ("probabilities", "inf", "size"): (1e3, 1e4, 1e5),
    ("probabilities", "2", "size"): (1e3, 1e4, 1e5),
    ("probabilities", "2", "none"): (10.0, 100.0, 1e3, 1e4),
    ("probabilities", "1", "none"): (100.0, 1e3, 1e4, 1e5),
    ("logits", "inf", "size"): (30.0, 100.0, 300.0),
    ("logits", "2", "size"): (100.0, 300.0, 1000.0),
    ("logits", "2", "none"): (1.0, 10.0, 100.0),
    ("logits", "1", "none"): (10.0, 100.0, 1000.0),
}
ALL_LAYERS = "input,conv0,conv1,fc0,logits"

_BASELINE = dict(
    optimizer="momentum",
    momentum=0.9,
    optimizer_epsilon=1e-7,
    learning_rate=0.01,
    xent_weight=0.0,
)
_MARGIN = dict(
    loss="margin",
    optimizer="rmsprop_tf1",
    momentum=0.0,
    optimizer_epsilon=1e-2,
    learning_rate=0.01,
    dist_norm="inf",
    alpha_factor=4.0,
    layers_weights="size",
    margin_epsilon=1e-6,
    top_k=1,
)
METHODS = {
    "xent": dict(_BASELINE, loss="xent"),
    "hinge": dict(_BASELINE, loss="hinge"),
    "margin_input": dict(_MARGIN, margin_layers="input"),
    "margin_all": dict(_MARGIN, margin_layers=ALL_LAYERS),
    "margin_all_logits": dict(_MARGIN, margin_layers=ALL_LAYERS, margin_score="logits"),
    # Control: cross-entropy alone with the margin methods' optimizer, which
    # separates the margin term's effect from the optimizer's.
    "xent_rmsprop": dict(_MARGIN, loss="xent"),
}
_CLASSES = {
    "": {},
    "_k9": dict(top_k=9),
    "_k9sum": dict(top_k=9, worst_case_loss=False),
    # Distances clipped below at 0 (not -3 gamma): a misclassified example (d < 0)
    # adds a constant, no gradient.
    "_a1": dict(alpha_factor=1.0),
}
for _name in [name for name in METHODS if name.startswith("margin")]:
  for _norm_suffix, _norm in (
      ("", {}),
      ("_l2", dict(dist_norm="2", layers_weights="none")),
      ("_l1", dict(dist_norm="1", layers_weights="none")),
      ("_l2size", dict(dist_norm="2")),
  ):
    for _classes_suffix, _classes in _CLASSES.items():
      METHODS[f"{_name}{_norm_suffix}{_classes_suffix}"] = dict(
          METHODS[_name], **_norm, **_classes
      )
# What every cell shares (flags of mnist.py), whatever the method.
SHARED = dict(
    num_validation=5000,
    weight_decay=5e-4,
    clip_norm=5.0,
    lr_schedule="piecewise",
    lr_boundaries="0.5,0.75",
    lr_decay_rate=0.1,
    verbose=2,
)

flags.DEFINE_enum(
    "task", "limited_data", (*TASKS, ROBUSTNESS), "What a point is (or robustness)."
)
flags.DEFINE_list("points", ["68", "550", "5500"], "Subset sizes or noise fractions.")
flags.DEFINE_list("methods", ["xent", "hinge", "margin_input", "margin_all"], "Methods.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
flags.DEFINE_list(
    "gammas",
    [],
    "Gammas of the margin cells (default: SEARCH_GAMMAS of the method's score "
    "and norm).",
)
flags.DEFINE_integer("search_seed", 0, "Seed at which several gammas are compared.")
flags.DEFINE_float("xent_weight", 1.0, "Cross-entropy weight of the margin methods.")
flags.DEFINE_integer("train_steps", 1000, "Steps of each cell.")
flags.DEFINE_integer("steps_per_loop", 100, "Steps between validation checks.")
flags.DEFINE_integer("batch_size", 256, "Batch size (at most the training-set size).")
flags.DEFINE_string("data_source", "embedded", "As mnist.py's --data_source.")
flags.DEFINE_string("out_dir", "/tmp/reproduce_mnist", "Runs and cells.jsonl.")
flags.DEFINE_string(
    "robustness_point", "0.0", "Noise fraction of the noisy_labels models --task=robustness evaluates."
)
flags.DEFINE_integer("robustness_examples", 1000, "Test images of --task=robustness.")
flags.DEFINE_integer("threads", 0, "TensorFlow threads per run (0: TensorFlow's default).")
FLAGS = flags.FLAGS

MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist.py")
EVALUATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate.py")
CELLS_FILE = "cells.jsonl"
NUM_TRAIN = 55000


def method_settings(name):
  """The mnist.py settings of method ``name`` (ValueError for an unknown one)."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(f"Unknown method {name!r}; known: {sorted(METHODS)}.") from None


def is_margin(method):
  return method_settings(method)["loss"] == "margin"


def gammas(method):
  """The gammas searched for ``method`` (one None for a method without gamma)."""
  if not is_margin(method):
    return [None]
  if FLAGS.gammas:
    return [float(g) for g in FLAGS.gammas]
  settings = method_settings(method)
  return list(
      SEARCH_GAMMAS[
          settings.get("margin_score", "probabilities"),
          settings["dist_norm"],
          settings["layers_weights"],
      ]
  )


def point_settings(task, point):
  """(mnist.py settings, number of training examples) of a point of ``task``."""
  if task == "limited_data":
    size = int(point)
    return dict(num_train_examples=size, noisy_label_fraction=0.0), size
  fraction = float(point)
  if not 0 <= fraction < 1:
    raise ValueError(f"A noise fraction must be in [0, 1); got {point!r}.")
  return dict(num_train_examples=0, noisy_label_fraction=fraction), NUM_TRAIN


def cell_name(task, method, point, seed, gamma):
  gamma_part = "" if gamma is None else f"_gamma={gamma:g}"
  return f"{task}/{method}/{point}{gamma_part}_seed={seed}"


def cell_settings(task, method, point, seed, gamma):
  """All mnist.py settings of a cell, and its training-set size."""
  settings, num_examples = point_settings(task, point)
  settings.update(SHARED, **method_settings(method))
  settings.update(
      seed=int(seed),
      train_steps=FLAGS.train_steps,
      steps_per_loop=FLAGS.steps_per_loop,
      batch_size=min(FLAGS.batch_size, num_examples),
      data_source=FLAGS.data_source,
  )
  if is_margin(method):
    settings.update(gamma=gamma, xent_weight=FLAGS.xent_weight)
  return settings, num_examples


def read_cells(out_dir):
  """The records of ``<out_dir>/cells.jsonl`` (the last record of a cell wins)."""
  path = os.path.join(out_dir, CELLS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["cell"]: r for r in records}


def append_cell(out_dir, record):
  """Appends one record as a line (a single write: concurrent drivers are safe)."""
  line = json.dumps(record, sort_keys=True) + "\n"
  fd = os.open(os.path.join(out_dir, CELLS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  try:
    os.write(fd, line.encode("utf-8"))
  finally:
    os.close(fd)


def claim(run_dir):
  """Claims a cell for this process; False if a living process holds it."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, "claim")
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
  except FileExistsError:
    with open(path, encoding="utf-8") as f:
      owner = int(f.read() or 0)
    if not owner or (owner != os.getpid() and process_alive(owner)):
      return False  # Held (or being claimed) by a living driver.
    os.remove(path)  # The owner died: take over (the run resumes).
    return claim(run_dir)
  with os.fdopen(fd, "w") as f:
    f.write(str(os.getpid()))
  return True


def process_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def record_of(cell, task, method, point, seed, gamma, settings, num_examples, results):
  """The cells.jsonl record of a finished run's results.json."""
  history = results["history"]
  active = {
      key.split("/", 1)[1]: [row[key] for row in history if key in row]
      for key in history[-1]
      if key.startswith("margin_active/")
  }
  medians = {
      key.split("/", 1)[1]: history[-1][key]
      for key in history[-1]
      if key.startswith("margin_distance_median/")
  }
  epochs = settings["train_steps"] * settings["batch_size"] / num_examples
  return dict(
      cell=cell,
      task=task,
      method=method,
      point=point,
      seed=int(seed),
      gamma=gamma,
      top_k=settings.get("top_k"),
      train_steps=settings["train_steps"],
      batch_size=settings["batch_size"],
      num_train_examples=results["num_train_examples"],
      epochs=epochs,
      fraction_of_paper_epochs=epochs / PAPER_EPOCHS,
      best_validation_accuracy=results["best_validation_accuracy"],
      best_validation_step=results["best_validation_step"],
      test_accuracy=results["best_validation_test_accuracy"],
      final_test_accuracy=results["test_accuracy"],
      train_seconds=results["train_seconds_this_run"],
      active_fraction_final=({k: v[-1] for k, v in active.items()}),
      active_fraction_mean=({k: sum(v) / len(v) for k, v in active.items()}),
      distance_median_final=medians,
      command=settings,
  )


def run_logged(command, run_dir):
  """Runs ``command`` with --threads, its output appended to <run_dir>/log.txt."""
  env = dict(os.environ)
  if FLAGS.threads:
    env.update(
        TF_NUM_INTRAOP_THREADS=str(FLAGS.threads),
        TF_NUM_INTEROP_THREADS=str(FLAGS.threads),
        OMP_NUM_THREADS=str(FLAGS.threads),
    )
  with open(os.path.join(run_dir, "log.txt"), "a", encoding="utf-8") as log:
    subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)


def run_cell(task, method, point, seed, gamma):
  """Trains one cell (unless it is done or claimed); returns True if it ran."""
  cell = cell_name(task, method, point, seed, gamma)
  run_dir = os.path.join(FLAGS.out_dir, "runs", cell)
  if not claim(run_dir):
    return False
  try:
    settings, num_examples = cell_settings(task, method, point, seed, gamma)
    command = [
        sys.executable,
        MNIST,
        f"--model_dir={run_dir}",
        *config_lib.to_argv(settings),
    ]
    start = time.time()
    run_logged(command, run_dir)
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
      results = json.load(f)
    append_cell(
        FLAGS.out_dir,
        record_of(cell, task, method, point, seed, gamma, settings, num_examples, results),
    )
    logging.info("%s: %.0f s, test %.4f", cell, time.time() - start,
                 results["best_validation_test_accuracy"])
  finally:
    os.remove(os.path.join(run_dir, "claim"))
  return True


def chosen_gamma(done, task, method, point):
  """The searched gamma with the best validation accuracy at --search_seed, or
  None while a search cell is unfinished."""
  scores = {}
  for gamma in gammas(method):
    record = done.get(cell_name(task, method, point, FLAGS.search_seed, gamma))
    if record is None:
      return None
    scores[gamma] = record["best_validation_accuracy"]
  return max(scores, key=scores.get)


def pending_cells(done):
  """(runnable cells, number of cells waiting for a search), in run order: the
  cells of --search_seed (every gamma) first, then the other seeds."""
  runnable, waiting = [], 0
  seeds = [int(s) for s in FLAGS.seeds]
  for point in FLAGS.points:
    for method in FLAGS.methods:
      for gamma in gammas(method):
        runnable.append((FLAGS.task, method, point, FLAGS.search_seed, gamma))
  for point in FLAGS.points:
    for method in FLAGS.methods:
      for seed in seeds:
        if seed == FLAGS.search_seed:
          continue
        options = gammas(method)
        if len(options) == 1:
          gamma = options[0]  # None for a method without gamma.
        else:
          gamma = chosen_gamma(done, FLAGS.task, method, point)
          if gamma is None:
            waiting += 1
            continue
        runnable.append((FLAGS.task, method, point, seed, gamma))
  runnable = [c for c in runnable if cell_name(*c) not in done]
  return runnable, waiting


def trained_cell(done, method, seed):
  """The noisy_labels record of ``method`` at --robustness_point, ``seed`` and its
  chosen gamma, or its one --gammas value (ValueError if it has not been trained)."""
  task, point = TASKS[1], FLAGS.robustness_point
  options = gammas(method)
  searched = len(options) > 1
  gamma = chosen_gamma(done, task, method, point) if searched else options[0]
  record = None if searched and gamma is None else done.get(
      cell_name(task, method, point, seed, gamma))
  if record is None:
    raise ValueError(
        f"--task=robustness needs the trained {task} cells of {method} at point "
        f"{point}, seed {seed} (and its gamma search): run --task={task} "
        f"--points={point} first.")
  return record


def robustness_record(cell, method, seed, model, source, evaluation):
  """The cells.jsonl record of one model's eval.json entry."""
  (result,) = evaluation["models"].values()
  keys = ("clean_accuracy", "white_box", "black_box", "certified", "zero_gradient_fraction",
          "margins", "transfer")
  return dict(
      cell=cell,
      task=ROBUSTNESS,
      method=method,
      point=FLAGS.robustness_point,
      seed=int(seed),
      gamma=model["gamma"],
      model_cell=model["cell"],
      source_cell=source["cell"],
      num_examples=evaluation["num_examples"],
      ifgsm_steps=evaluation["ifgsm_steps"],
      attack_losses=evaluation["attack_losses"],
      **{k: result.get(k) for k in keys},
  )


def run_robustness(done):
  """Evaluates every (method, seed) of --task=robustness not yet in cells.jsonl."""
  seeds = [int(s) for s in FLAGS.seeds]
  for method in FLAGS.methods:
    for seed in seeds:
      cell = f"{ROBUSTNESS}/{method}/{FLAGS.robustness_point}_seed={seed}"
      if cell in done:
        continue
      model = trained_cell(done, method, seed)
      source = trained_cell(done, "xent", seeds[(seeds.index(seed) + 1) % len(seeds)])
      run_dir = os.path.join(FLAGS.out_dir, "runs", cell)
      if not claim(run_dir):
        continue
      try:
        start = time.time()
        run_logged([
            sys.executable,
            EVALUATE,
            f"--model={model_path(model)}",
            f"--source_model={model_path(source)}",
            f"--data_source={FLAGS.data_source}",
            f"--num_examples={FLAGS.robustness_examples}",
            "--deepfool_steps=0",
            "--dist_norm=inf",
            f"--output_dir={run_dir}",
        ], run_dir)
        with open(os.path.join(run_dir, "eval.json"), encoding="utf-8") as f:
          evaluation = json.load(f)
        append_cell(FLAGS.out_dir, robustness_record(cell, method, seed, model, source, evaluation))
        logging.info("%s: %.0f s", cell, time.time() - start)
      finally:
        os.remove(os.path.join(run_dir, "claim"))


def model_path(record):
  return os.path.join(FLAGS.out_dir, "runs", record["cell"], "model.keras")


def main(_):
  for method in FLAGS.methods:
    method_settings(method)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  if FLAGS.task == ROBUSTNESS:
    run_robustness(read_cells(FLAGS.out_dir))
    return
  for point in FLAGS.points:
    point_settings(FLAGS.task, point)
  while True:
    runnable, waiting = pending_cells(read_cells(FLAGS.out_dir))
    if not runnable and not waiting:
      break
    # Runs the first cell no other driver holds, then looks again (a finished
    # search may make more cells runnable).
    if not any(run_cell(*cell) for cell in runnable):
      time.sleep(30)
  logging.info("All cells done: %s", os.path.join(FLAGS.out_dir, CELLS_FILE))


if __name__ == "__main__":
  app.run(main)
