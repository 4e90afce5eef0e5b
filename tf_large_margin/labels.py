"""Label handling shared by the library's Keras losses."""

import tensorflow as tf


def to_one_hot(y_true, num_classes, rank=2, dtype="float32"):
  """Integer or one-hot labels -> one-hot labels of ``dtype``.

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
    ValueError: for a shape that is neither; InvalidArgumentError (when run) for
      class ids outside [0, num_classes).
  """
  y_true = tf.convert_to_tensor(y_true)
  y_rank = y_true.shape.rank
  last = y_true.shape[-1] if y_rank else None
  if y_rank == rank and last == num_classes and num_classes != 1:
    return tf.cast(y_true, dtype)
  if y_rank == rank and last == 1:
    y_true = tf.squeeze(y_true, axis=-1)
  elif y_rank != rank - 1:
    raise ValueError(
        f"Labels must be integer class ids of shape (N,) or (N, 1), or one-hot of "
        f"shape (N, {num_classes}); got shape {tuple(y_true.shape)}."
    )
  labels = tf.cast(y_true, tf.int32)
  with tf.control_dependencies(
      [
          tf.debugging.assert_non_negative(labels, message="class ids must be >= 0"),
          tf.debugging.assert_less(
              labels, num_classes, message=f"class ids must be < {num_classes}"
          ),
      ]
  ):
    return tf.one_hot(labels, num_classes, dtype=dtype)
