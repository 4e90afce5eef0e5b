"""Keras callbacks: `LambdaScheduler`, which advances the lambda schedules of
L-Softmax / SphereFace losses to `model.optimizer.iterations` during `fit`.

(The margin monitor callback is `tf_large_margin.monitor.MarginMonitor`.)
"""

import keras
from keras import ops

from tf_large_margin.multiplicative_margin_losses import LSoftmax


class LambdaScheduler(keras.callbacks.Callback):
  """Advances the `lambda_` schedules of `LSoftmax` / `SphereFace` losses.

  A loss with a schedule `lambda_` evaluates it at its non-trainable variable
  `step`, read inside the compiled train function. Before each training batch
  (and at the end of training) this callback sets that variable to
  `model.optimizer.iterations`, so the loss of step `i` uses `lambda_(i)`,
  and a run resumed from a checkpoint (e.g. `keras.callbacks.BackupAndRestore`)
  continues the schedule where it stopped. With `steps_per_execution=k` the
  step is updated once every `k` steps.

  Losses with a constant `lambda_` (and models without such losses) are left
  alone, so the callback can be added to any `fit`. Evaluation uses the
  `lambda` of the current step. Without this callback the schedule stays at
  its step-0 value.

  At the end of each epoch it adds the `lambda` of the epoch's last step to
  the logs (key `"lambda"`, or `"<loss name>_lambda"` when there are several
  scheduled losses), so `History`, `CSVLogger` and `TensorBoard` placed after
  it record it.

  Args:
      losses: The losses to update. Default: those found in `model.loss`
          (a loss, or a list / dict of losses) when training starts.

  Example:

  ```python
  loss = SphereFace(m=4, lambda_=LambdaDecay(1000.0, 0.12, 1.0, 5.0))
  model.compile("adam", loss=loss, metrics=[HeadOutputAccuracy()])
  model.fit(x, y, epochs=10, callbacks=[LambdaScheduler()])
  ```
  """

  def __init__(self, losses=None):
    super().__init__()
    self._given_losses = losses
    self._losses = []

  def _scheduled(self, losses):
    return [
        loss
        for loss in keras.tree.flatten(losses)
        if isinstance(loss, LSoftmax) and loss.step is not None
    ]

  def _update(self):
    if self._losses:
      step = ops.convert_to_tensor(self.model.optimizer.iterations)
      for loss in self._losses:
        loss.step.assign(ops.cast(step, loss.step.dtype))

  def on_train_begin(self, logs=None):
    losses = self._given_losses
    if losses is None:
      losses = getattr(self.model, "loss", None)
    self._losses = self._scheduled(losses) if losses is not None else []

  def on_train_batch_begin(self, batch, logs=None):
    self._update()

  def on_epoch_end(self, epoch, logs=None):
    if logs is None:
      return
    for loss in self._losses:
      key = "lambda" if len(self._losses) == 1 else f"{loss.name}_lambda"
      logs[key] = float(loss.current_lambda())

  def on_train_end(self, logs=None):
    self._update()
