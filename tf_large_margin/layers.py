"""Normalised classifier head for output-space large-margin losses.

The angular margin losses (`tf_large_margin.additive_margin_losses`,
`tf_large_margin.multiplicative_margin_losses`) operate on the angle ``theta_j``
between a feature vector ``x`` and the class weight vector ``w_j`` rather than on
the raw logits ``z_j = <x, w_j>``. `CosineHead` is the final (bias-free)
classification layer that exposes that angle.

Output conventions (``C = units``):

* ``return_norms=False`` (default): a ``(..., C)`` tensor

      out_j = scale_j * cos(theta_j),
      scale_j = (||x||   if not normalize_features else 1)
              * (||w_j|| if not normalize_weights  else 1)

  With the defaults (both normalised) this is just ``cos(theta_j)``, the input
  expected by `AMSoftmax` / `CosFace` and `ArcFace`.

* ``return_norms=True``: a ``(..., 2C)`` tensor ``concat([cos, scale])`` where
  ``cos[..., j] = cos(theta_j)`` and ``scale`` is as above, broadcast to
  ``(..., C)``. This is the input expected by `LSoftmax`
  (``normalize_weights=False, normalize_features=False``, so
  ``scale_j = ||w_j|| ||x||``) and `SphereFace`
  (``normalize_weights=True, normalize_features=False``, so
  ``scale_j = ||x||``). The ordinary logits are ``cos * scale``; use
  `split_head_output` / `head_output_logits` to recover them (e.g. for
  accuracy or `argmax` at inference time).

In every case ``cos(theta_j)`` is clipped to ``[-1, 1]``.

For models ending in a ``return_norms=True`` head, compile with
`HeadOutputAccuracy` (Keras' ``"accuracy"`` would take the argmax over all 2C
columns) and give attacks and margin estimates `logits_model(model)`, which
returns the logits ``cos * scale``.
"""

import numbers

import keras
from keras import ops

from tf_large_margin import compat
from tf_large_margin.labels import at_least
from tf_large_margin.labels import to_one_hot

# Floor of the squared norms, so that the gradient of the norm stays finite at
# the zero vector (same role as in `tf.math.l2_normalize`).
_NORM_EPSILON = 1e-12
_NORM_FLOOR = _NORM_EPSILON**0.5


def _l2_norm(x, axis):
  """sqrt(max(sum(x^2), _NORM_EPSILON)) along ``axis`` (kept).

  Computed as m ||x / m|| with m = max |x| (held constant for the gradient, which
  is that of ||x||): the squares of x / m lie in [0, 1], so they neither overflow
  (|x| > 1e19 in float32 and bfloat16, > 255 in float16) nor underflow (the floor
  _NORM_EPSILON is 0 in float16), which made the head's output inf or NaN.
  """
  largest = ops.stop_gradient(ops.max(ops.abs(x), axis=axis, keepdims=True))
  largest = ops.where(largest > 0, largest, _NORM_FLOOR)
  # sum((x / m)^2) >= 1 unless x = 0 (then m = _NORM_FLOOR and the norm is the floor).
  squares = at_least(ops.sum(ops.square(x / largest), axis=axis, keepdims=True), 1.0)
  return at_least(largest * ops.sqrt(squares), _NORM_FLOOR)


def split_head_output(y_pred):
  """Splits a `CosineHead(return_norms=True)` output into `(cos, scale)`.

  Args:
      y_pred: Tensor of shape `(..., 2C)` laid out as `concat([cos, scale])`.

  Returns:
      A tuple `(cos, scale)` of tensors of shape `(..., C)`.

  Raises:
      ValueError: if the (static) last dimension is not even.
  """
  y_pred = ops.convert_to_tensor(y_pred)
  last = y_pred.shape[-1]
  if last is None:
    raise ValueError(
        "The last dimension of the head output must be statically known "
        "to split it into (cos, norms)."
    )
  if last % 2 != 0:
    raise ValueError(
        "Expected a head output of shape (..., 2 * num_classes) laid out "
        "as concat([cos_theta, norms]) (CosineHead(return_norms=True)); "
        f"got last dimension {last}, which is odd."
    )
  num_classes = last // 2
  return y_pred[..., :num_classes], y_pred[..., num_classes:]


def head_output_logits(y_pred):
  """Ordinary logits `scale_j * cos(theta_j)` from a `return_norms=True` output."""
  cos, scale = split_head_output(y_pred)
  return cos * scale


def head_output_accuracy(y_true, y_pred):
  """Per-example accuracy (0 or 1) of a `CosineHead(return_norms=True)` output.

  The prediction is the argmax of `head_output_logits(y_pred)` (ties: the first
  class, as `keras.metrics.sparse_categorical_accuracy`).

  Args:
      y_true: Integer labels `(N,)`/`(N, 1)` or one-hot labels `(N, C)`.
      y_pred: `concat([cos, scale])` of shape `(N, 2C)`.

  Returns:
      A float tensor of shape `(N,)`.
  """
  logits = head_output_logits(y_pred)
  num_classes = logits.shape[-1]
  one_hot = to_one_hot(y_true, num_classes, len(logits.shape), dtype=logits.dtype)
  predicted = ops.one_hot(ops.argmax(logits, axis=-1), num_classes, dtype=logits.dtype)
  return ops.sum(one_hot * predicted, axis=-1)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class HeadOutputAccuracy(keras.metrics.MeanMetricWrapper):
  """Accuracy of a model ending in `CosineHead(return_norms=True)`.

  Keras' `"accuracy"` on such a model's `(N, 2C)` output `concat([cos, scale])`
  would take the argmax over cosines and scales together; this metric compares
  the labels with the argmax of the logits `scale * cos`
  (`head_output_accuracy`). Its default name is `"accuracy"`, so the logs keep
  the keys `accuracy` / `val_accuracy`.

  Args:
      name: Metric name. Default `"accuracy"`.
      dtype: Metric dtype.

  Example:

  ```python
  head = CosineHead(10, normalize_features=False, return_norms=True)
  model = keras.Sequential([keras.Input((32,)), head])
  model.compile("adam", loss=SphereFace(m=4), metrics=[HeadOutputAccuracy()])
  ```
  """

  def __init__(self, name="accuracy", dtype=None):
    super().__init__(fn=head_output_accuracy, name=name, dtype=dtype)
    compat.set_metric_direction(self, "up")

  def get_config(self):
    return {"name": self.name, "dtype": self.dtype}

  @classmethod
  def from_config(cls, config):
    return cls(**config)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class CosineHead(keras.layers.Layer):
  """Bias-free classification layer exposing `cos(theta_j)`.

  Computes, for each class `j` with weight column `w_j`,

  ```
  cos(theta_j) = clip(<x / ||x||, w_j / ||w_j||>, -1, 1)
  ```

  and returns `scale_j * cos(theta_j)` (or `[cos, scale]`, see
  `return_norms`), with `scale_j = ||x||^(1 - nf) * ||w_j||^(1 - nw)` where
  `nf = normalize_features`, `nw = normalize_weights`.

  Typical configurations:

  | loss                         | normalize_features | normalize_weights | return_norms |
  |------------------------------|--------------------|-------------------|--------------|
  | `AMSoftmax`/`CosFace`, `ArcFace` | True           | True              | False        |
  | `SphereFace` (A-Softmax)     | False              | True              | True         |
  | `LSoftmax`                   | False              | False             | True         |

  With `normalize_features=False, normalize_weights=False` and
  `return_norms=False` the layer is (up to the clipping) a bias-free
  `Dense` layer.

  Args:
      units: Number of classes `C`.
      normalize_features: Divide the input by its L2 norm (over the last
          axis). Default `True`.
      normalize_weights: Divide each weight column `w_j` by its L2 norm.
          Default `True`.
      return_norms: If `True`, output `concat([cos, scale], axis=-1)` with
          shape `(..., 2 * units)` instead of `scale * cos`. Default `False`.
      kernel_initializer: Initializer for the `(input_dim, units)` kernel.
      kernel_regularizer: Optional regularizer for the kernel.
      kernel_constraint: Optional constraint for the kernel.
      **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

  Example:

  ```python
  inputs = keras.Input((784,))
  feats = keras.layers.Dense(64, activation="relu")(inputs)
  cos = tf_large_margin.layers.CosineHead(10)(feats)
  model = keras.Model(inputs, cos)
  model.compile("adam", tf_large_margin.ArcFace(margin=0.5, scale=30.0))
  ```
  """

  def __init__(
      self,
      units,
      normalize_features=True,
      normalize_weights=True,
      return_norms=False,
      kernel_initializer="glorot_uniform",
      kernel_regularizer=None,
      kernel_constraint=None,
      **kwargs,
  ):
    super().__init__(**kwargs)
    if isinstance(units, bool) or not isinstance(units, numbers.Integral) or units < 1:
      raise ValueError(f"`units` must be a positive integer, got units={units!r}.")
    self.units = int(units)
    self.normalize_features = bool(normalize_features)
    self.normalize_weights = bool(normalize_weights)
    self.return_norms = bool(return_norms)
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
    self.kernel_constraint = keras.constraints.get(kernel_constraint)
    self.input_spec = keras.layers.InputSpec(min_ndim=2)

  def build(self, input_shape):
    input_dim = input_shape[-1]
    if input_dim is None:
      raise ValueError(
          "CosineHead needs a known last input dimension; got "
          f"input_shape={input_shape}."
      )
    self.kernel = self.add_weight(
        name="kernel",
        shape=(input_dim, self.units),
        initializer=self.kernel_initializer,
        regularizer=self.kernel_regularizer,
        constraint=self.kernel_constraint,
    )
    self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

  def call(self, inputs):
    x = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
    w = ops.convert_to_tensor(self.kernel, dtype=self.compute_dtype)
    x_norm = _l2_norm(x, axis=-1)  # (..., 1)
    w_norm = _l2_norm(w, axis=0)  # (1, C)
    # `@`, not keras.ops.matmul: Keras' PyTorch backend computes that in float32
    # for float64 tensors.
    cos = (x / x_norm) @ (w / w_norm)
    cos = ops.clip(cos, -1.0, 1.0)

    scale = None
    if not self.normalize_features:
      scale = x_norm
    if not self.normalize_weights:
      w_norm_row = ops.reshape(w_norm, (self.units,))
      scale = w_norm_row if scale is None else scale * w_norm_row

    if self.return_norms:
      if scale is None:
        scale = ops.ones_like(cos)
      else:
        scale = ops.broadcast_to(scale, ops.shape(cos))
      return ops.concatenate([cos, scale], axis=-1)
    if scale is None:
      return cos
    return cos * scale

  def compute_output_shape(self, input_shape):
    out = self.units * 2 if self.return_norms else self.units
    return tuple(input_shape[:-1]) + (out,)

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "units": self.units,
            "normalize_features": self.normalize_features,
            "normalize_weights": self.normalize_weights,
            "return_norms": self.return_norms,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
        }
    )
    return config


@keras.saving.register_keras_serializable(package="tf_large_margin")
class HeadOutputLogits(keras.layers.Layer):
  """`head_output_logits` as a layer: `(..., 2C)` `[cos, scale]` -> `(..., C)` logits."""

  def call(self, inputs):
    return head_output_logits(inputs)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (input_shape[-1] // 2,)


def returns_head_output(model):
  """True if `model` ends in a `CosineHead(return_norms=True)`, i.e. returns
  `concat([cos, scale])` (2C columns) instead of logits."""
  layers = getattr(model, "layers", None)
  return bool(layers) and isinstance(layers[-1], CosineHead) and layers[-1].return_norms


def accuracy_metric(model):
  """The accuracy metric to compile `model` with, logged as `"accuracy"`:
  `HeadOutputAccuracy()` if it ends in a `CosineHead(return_norms=True)`,
  Keras' `"accuracy"` otherwise."""
  return HeadOutputAccuracy() if returns_head_output(model) else "accuracy"


def logits_model(model):
  """A model returning logits: `model` itself, or, if it ends in a
  `CosineHead(return_norms=True)`, a functional model sharing its layers whose
  output is `head_output_logits` of `model`'s output.

  Attacks (`tf_large_margin.attacks`), margin estimates
  (`tf_large_margin.margin_estimation`) and `argmax` predictions need the logits; models
  trained with `LSoftmax` / `SphereFace` return `[cos, scale]`.

  Args:
      model: A Keras model with one output (functional or Sequential when it
          ends in such a head).

  Returns:
      A Keras model.
  """
  if not returns_head_output(model):
    return model
  logits = HeadOutputLogits(name=f"{model.layers[-1].name}_logits")(model.outputs[0])
  # One input as a tensor, not a list of one: the model is called with a tensor.
  inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
  return keras.Model(inputs, logits, name=f"{model.name}_logits")
