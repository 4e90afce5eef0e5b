"""Resumable training in loops: the schedule, checkpoints, logs and progress lines.

A run trains ``loops`` Keras epochs ("loops") of ``steps_per_loop`` steps; with
--epochs a loop is one pass over the training set, otherwise a loop is just a
number of steps (``--steps_per_loop``) and the progress lines say "Loop", with
the passes over the training set done so far.

`Checkpoints` saves the model with its optimizer state (weights, slots, step) to
``<model_dir>/checkpoint/latest.weights.h5`` every ``checkpoint_steps`` steps and
at the end of every loop (after its validation and logs). `fit` restores the
latest checkpoint and trains from its step: the training data is a function of
the step (``train(start_step)``, see `tf_large_margin.datasets.make_tf_dataset`),
so a run killed at any point and started again with the same settings ends with
the weights of an uninterrupted run. A loop the kill cut short is finished first
(its logged metrics then cover only the steps after the restart).
"""

import csv
import os
import shutil

from absl import logging
import keras

import tf_large_margin as tlm

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "latest.weights.h5"
# Keras saves weights only to names ending in ".weights.h5".
_PARTIAL_FILE = "partial.weights.h5"


def schedule(config, num_train_examples):
  """(loops, steps per loop) of a `RunConfig`: --epochs passes of
  num_train_examples // batch_size steps (as the original: batches are full and
  may span two passes), or --train_steps in loops of --steps_per_loop."""
  if config.epochs > 0:
    return config.epochs, max(1, num_train_examples // config.batch_size)
  steps_per_loop = min(config.steps_per_loop, config.train_steps)
  if steps_per_loop < 1 or config.train_steps % steps_per_loop:
    raise ValueError(
        f"--steps_per_loop={config.steps_per_loop} must divide "
        f"--train_steps={config.train_steps}."
    )
  return config.train_steps // steps_per_loop, steps_per_loop


def optimizer_step(model):
  """The optimizer's step count (a mirrored variable under tf.distribute)."""
  return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class Checkpoints(keras.callbacks.Callback):
  """Saves the training state every ``every_steps`` steps and after each loop.

  Each save replaces the previous checkpoint atomically (written to a temporary
  file, then renamed), so a kill never leaves a partial checkpoint behind. Put
  it after the callbacks whose end-of-loop output the checkpoint must follow
  (logs, best weights).
  """

  def __init__(self, directory, every_steps=0):
    super().__init__()
    self.directory = directory
    self.every_steps = every_steps
    self.path = os.path.join(directory, CHECKPOINT_FILE)
    self._step = 0
    self._saved_step = None

  def exists(self):
    return os.path.exists(self.path)

  def restore(self, model):
    """Loads the latest checkpoint into ``model`` (built and compiled); returns
    its step (0 without a checkpoint)."""
    if not self.exists():
      return 0
    if not model.optimizer.built:
      model.optimizer.build(model.trainable_variables)
    model.load_weights(self.path)
    step = optimizer_step(model)
    logging.info("Restored the checkpoint of step %d from %s", step, self.path)
    return step

  def remove(self):
    if os.path.exists(self.directory):
      shutil.rmtree(self.directory)

  def on_train_begin(self, logs=None):
    self._step = optimizer_step(self.model)

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    last_of_loop = batch + 1 == self.params["steps"]  # saved by on_epoch_end
    if self.every_steps and self._step % self.every_steps == 0 and not last_of_loop:
      self.save()

  def on_epoch_end(self, epoch, logs=None):
    self.save()

  def save(self):
    if self._saved_step == self._step:
      return
    os.makedirs(self.directory, exist_ok=True)
    partial = os.path.join(self.directory, _PARTIAL_FILE)
    self.model.save_weights(partial, overwrite=True)
    os.replace(partial, self.path)
    self._saved_step = self._step
    logging.info("Checkpoint of step %d written to %s", self._step, self.path)


class LoopProgress(keras.callbacks.ProgbarLogger):
  """Keras' progress bar headed "Epoch i/n" when loops are passes over the
  training set, else "Loop i/n (steps a-b of T; k passes over the training set
  by its end)": with --train_steps a Keras epoch is not a pass over the data.

  Args:
    loops, steps_per_loop: from `schedule`.
    loops_are_epochs: whether each loop is a pass over the training set.
    examples_per_step: the global batch size.
    num_examples: the training set size.
  """

  def __init__(
      self, loops, steps_per_loop, loops_are_epochs, examples_per_step, num_examples
  ):
    super().__init__()
    self.loops = loops
    self.steps_per_loop = steps_per_loop
    self.loops_are_epochs = loops_are_epochs
    self.examples_per_step = examples_per_step
    self.num_examples = num_examples
    self.start_step = 0

  def set_params(self, params):
    super().set_params(params)
    self.epochs = 1  # Keras' own "Epoch i/n" header is replaced by ours.

  def header(self, loop):
    """The line printed before loop ``loop`` (0-based)."""
    if self.loops_are_epochs:
      return f"Epoch {loop + 1}/{self.loops}"
    first = max(self.start_step, loop * self.steps_per_loop)
    last = (loop + 1) * self.steps_per_loop
    passes = last * self.examples_per_step / max(1, self.num_examples)
    return (
        f"Loop {loop + 1}/{self.loops} (steps {first + 1}-{last} of "
        f"{self.loops * self.steps_per_loop}; {passes:.3g} passes over the "
        "training set by its end)"
    )

  def on_epoch_begin(self, epoch, logs=None):
    super().on_epoch_begin(epoch, logs)
    if self.verbose:
      print(self.header(epoch), flush=True)


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


def make_callbacks(directory, has_validation, progress=None, monitors=()):
  """Logs, progress line and (with validation) the best-on-validation weights;
  ``monitors`` (callbacks adding to the epoch logs) run before the logs.

  Without a checkpoint to resume from, the run starts afresh: the history and
  best weights of an earlier finished run in ``directory`` are removed.
  """
  history_path = os.path.join(directory, "history.csv")
  best_path = os.path.join(directory, "best.weights.h5")
  if not os.path.exists(os.path.join(directory, CHECKPOINT_DIR)):
    for path in (history_path, best_path):
      if os.path.exists(path):
        os.remove(path)
  callbacks = [
      # Advances the lambda schedule of --loss=lsoftmax|sphereface (else no-op).
      tlm.LambdaScheduler(),
      *monitors,
      keras.callbacks.TensorBoard(os.path.join(directory, "tensorboard")),
      keras.callbacks.CSVLogger(history_path, append=True),
  ]
  if progress is not None:
    callbacks.append(progress)
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


def fit(model, train, loops, steps_per_loop, checkpoints, callbacks, **fit_kwargs):
  """Trains ``model`` from the step of ``checkpoints`` (0 without one) to
  ``loops * steps_per_loop`` steps.

  Args:
    model: the compiled model.
    train: start_step -> the training data set from that step on (endless).
    loops, steps_per_loop: from `schedule`.
    checkpoints: a `Checkpoints`; also added to ``callbacks`` (last).
    callbacks: the other callbacks of `keras.Model.fit`; a `LoopProgress`
      among them is told the step each fit starts at.
    **fit_kwargs: more arguments of `keras.Model.fit` (validation_data, verbose).

  Returns:
    The step training started at (0, or the restored checkpoint's).
  """
  start = step = checkpoints.restore(model)
  total = loops * steps_per_loop
  callbacks = list(callbacks) + [checkpoints]
  while step < total:
    loop, offset = divmod(step, steps_per_loop)
    # A loop cut short by the kill is finished on its own first.
    end_loop = loop + 1 if offset else loops
    for callback in callbacks:
      if isinstance(callback, LoopProgress):
        callback.start_step = step
    model.fit(
        train(step),
        initial_epoch=loop,
        epochs=end_loop,
        steps_per_epoch=steps_per_loop - offset,
        shuffle=False,
        callbacks=callbacks,
        **fit_kwargs,
    )
    step = end_loop * steps_per_loop
  return start
