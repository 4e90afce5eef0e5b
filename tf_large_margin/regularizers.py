"""Weight decay over all trainable variables, as the original training code."""

import keras


@keras.saving.register_keras_serializable(package="tf_large_margin")
class WeightDecay(keras.regularizers.Regularizer):
  """``rate * sum(v^2) / 2`` of a variable v (TF1's ``rate * tf.nn.l2_loss(v)``).

  Keras' `L2(l2)` is ``l2 * sum(v^2)``: `WeightDecay(rate)` equals `L2(rate / 2)`,
  stated the original's way.
  """

  def __init__(self, rate):
    rate = float(rate)
    if rate < 0:
      raise ValueError(f"Weight decay rate must be >= 0; got {rate}.")
    self.rate = rate

  def __call__(self, x):
    return self.rate * 0.5 * keras.ops.sum(keras.ops.square(x))

  def get_config(self):
    return {"rate": self.rate}


def apply_weight_decay(model, rate):
  """Adds `WeightDecay(rate)` to every trainable variable of a built ``model``.

  The original MNIST code adds ``rate * sum_v l2_loss(v)`` over *all* trainable
  variables (kernels, biases, batch-norm scales and offsets) to the loss. Keras
  collects variable regularizers into ``model.losses``, which both a plain Keras
  training step and `tf_large_margin.MarginModel`'s step add to the loss, so the
  gradient (and its clipping) sees the decay as in the original.

  Variable regularizers are not part of a layer's config: a saved and reloaded
  model has no decay until this is called again.

  Returns:
    ``model``.

  Raises:
    ValueError: the model has no trainable variables (not built?) or one of them
      already has a regularizer (it would be counted twice).
  """
  variables = model.trainable_variables
  if not variables:
    raise ValueError(
        f"Model {model.name!r} has no trainable variables: build it "
        "before applying weight decay."
    )
  taken = [v.path for v in variables if v.regularizer is not None]
  if taken:
    raise ValueError(
        f"Variables {taken} already have a regularizer; weight decay "
        "would add a second one."
    )
  for variable in variables:
    variable.regularizer = WeightDecay(rate)
  return model
