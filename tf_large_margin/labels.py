"""Labels and predictions as the library's Keras losses read them.

`to_one_hot` turns integer or one-hot labels into one-hot rows; the output-margin
losses (`hinge_loss`, `additive_margin_losses`, `multiplicative_margin_losses`)
also use `working_precision` (half precision widened to float32), `at_least`,
`one_hot_like`, `target_column` (z_y) and `replace_target` (z with z_y replaced).
"""

import keras
from keras import ops


def to_one_hot(y_true, num_classes, rank=2, dtype="float32"):
  """Integer or one-hot labels -> one-hot labels of ``dtype`` (any Keras backend).

  Args:
    y_true: integer class ids of shape ``batch_shape`` or ``batch_shape + (1,)``
      (any numeric dtype: Keras passes them as floats), or one-hot labels of shape
      ``batch_shape + (num_classes,)``, used as given.
    num_classes: the number of classes C.
    rank: the rank of the predictions, ``len(batch_shape) + 1``.
    dtype: dtype of the result.

  Returns:
    A ``batch_shape + (num_classes,)`` tensor.

  Raises:
    ValueError: for a shape that is neither. Under the TensorFlow backend, class ids
      outside [0, num_classes) raise InvalidArgumentError when run; JAX and PyTorch
      cannot check values inside a traced function, and there such an id gives a
      row of zeros (`keras.ops.one_hot`).
  """
  y_true = ops.convert_to_tensor(y_true)
  y_rank = len(y_true.shape)
  last = y_true.shape[-1] if y_rank else None
  if y_rank == rank and last == num_classes and num_classes != 1:
    return ops.cast(y_true, dtype)
  if y_rank == rank and last == 1:
    y_true = ops.squeeze(y_true, axis=-1)
  elif y_rank != rank - 1:
    raise ValueError(
        f"Labels must be integer class ids of shape (N,) or (N, 1), or one-hot of "
        f"shape (N, {num_classes}); got shape {tuple(y_true.shape)}."
    )
  labels = ops.cast(y_true, "int32")
  if keras.backend.backend() == "tensorflow":
    labels = _checked_class_ids(labels, num_classes)
  return ops.one_hot(labels, num_classes, dtype=dtype)


def _checked_class_ids(labels, num_classes):
  """``labels`` after TensorFlow's run-time checks 0 <= id < num_classes."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  with tf.control_dependencies(
      [
          tf.debugging.assert_non_negative(labels, message="class ids must be >= 0"),
          tf.debugging.assert_less(
              labels, num_classes, message=f"class ids must be < {num_classes}"
          ),
      ]
  ):
    return tf.identity(labels)


def working_dtype(*values):
  """The dtype the margin math runs in for tensors (or dtypes) ``values``: "float64"
  if one of them is float64, "float32" otherwise (float16, bfloat16 and float32 are
  computed in float32, as under mixed precision)."""
  dtypes = [keras.backend.standardize_dtype(getattr(v, "dtype", v)) for v in values]
  return "float64" if "float64" in dtypes else "float32"


def working_precision(y_pred):
  """``y_pred`` as a tensor, half precision (float16, bfloat16) widened to float32."""
  y_pred = ops.convert_to_tensor(y_pred)
  if keras.backend.standardize_dtype(y_pred.dtype) in ("float16", "bfloat16"):
    return ops.cast(y_pred, "float32")
  return y_pred


def one_hot_like(y_true, scores):
  """One-hot labels with the shape and dtype of ``scores`` (classes last)."""
  num_classes = scores.shape[-1]
  if num_classes is None:
    raise ValueError(
        "The number of classes (last dimension of y_pred) must be statically known."
    )
  return to_one_hot(y_true, num_classes, len(scores.shape), dtype=scores.dtype)


def at_least(x, floor):
  """max(x, floor) elementwise in the dtype of ``x`` (``floor`` a Python float),
  with `tf.maximum`'s gradient (to ``x`` where x >= floor).

  Not `keras.ops.maximum`: under the PyTorch backend it returns float32 for float64
  tensors (Keras 3.15 with torch 2.13), and JAX would round ``floor`` to float32
  first; the floor is converted to the dtype of ``x`` directly.
  """
  floor = ops.convert_to_tensor(floor, x.dtype)
  return ops.where(x < floor, floor, x)


def replace_target(one_hot, values, target_values):
  """``values`` with the target column replaced by ``target_values[..., None]``."""
  return ops.where(
      ops.greater(one_hot, 0.5), ops.expand_dims(target_values, -1), values
  )


def target_column(one_hot, values):
  """The target entry of each row, sum_j one_hot_j * values_j."""
  return ops.sum(one_hot * values, axis=-1)


def softmax_xent(one_hot, logits):
  """Softmax cross-entropy -log softmax(logits)_y per example."""
  return ops.categorical_crossentropy(one_hot, logits, from_logits=True)
