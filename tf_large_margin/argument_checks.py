"""Argument checks shared by the losses, the attacks, the margin estimates and the bounds.

Each check raises ValueError with a message naming the argument, before any
computation, and returns the value in the form the caller computes with. Labels are
integer class indices of shape [batch].
"""

import math
import numbers

import keras
from keras import ops
import numpy as np


def check_real(name, value, *, positive=False, upper=None):
  """Returns ``value`` as a float after checking it is a finite Python real number.

  For hyper-parameters kept in a `get_config` (losses, schedules): unlike
  `check_nonnegative`, strings, tensors and booleans are rejected. It must be >= 0
  (> 0 if ``positive``) and, if ``upper`` is given, < ``upper``.
  """
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not math.isfinite(value)
  ):
    raise ValueError(f"`{name}` must be a finite real number, got {name}={value!r}.")
  if positive and value <= 0:
    raise ValueError(f"`{name}` must be positive (> 0), got {name}={value!r}.")
  if value < 0:
    raise ValueError(f"`{name}` must be non-negative (>= 0), got {name}={value!r}.")
  if upper is not None and value >= upper:
    raise ValueError(
        f"`{name}` is out of range: it must be < {upper}, got {name}={value!r}."
    )
  return float(value)


def check_nonnegative(name, value):
  """Returns ``value`` as a float after checking it is finite and >= 0."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number; got {value!r}.") from None
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be finite and >= 0; got {value}.")
  return value


def check_steps(steps, name="steps"):
  """Returns ``steps`` after checking it is an integer >= 1."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {steps!r}.")
  return int(steps)


def check_clip_range(clip_min, clip_max):
  """Checks clip_min < clip_max."""
  if not clip_min < clip_max:
    raise ValueError(f"clip_min must be < clip_max; got [{clip_min}, {clip_max}].")


def check_data_range(x, clip_min, clip_max):
  """Checks clip_min < clip_max and that ``x`` lies in [clip_min, clip_max]."""
  check_clip_range(clip_min, clip_max)
  low, high = float(ops.min(x)), float(ops.max(x))
  if low < clip_min or high > clip_max:
    raise ValueError(
        f"x must lie in the data range [clip_min, clip_max] = [{clip_min}, "
        f"{clip_max}]; its values span [{low}, {high}]."
    )


def check_logits_and_labels(model, x, labels):
  """Validates the model's output on ``x`` and the labels.

  The model must map a [batch, ...] input to [batch, classes] float logits, and the
  labels must be integers in [0, classes) of shape [batch]. One example is run
  through the model to learn its number of classes.

  Returns:
    ``(labels as an int32 tensor, number of classes)``.
  """
  x = ops.convert_to_tensor(x)
  if len(x.shape) < 1 or x.shape[0] == 0:
    raise ValueError(f"x must be a non-empty batch [batch, ...]; got shape {x.shape}.")
  logits = model(x[:1], training=False)
  if not ops.is_tensor(logits) or len(logits.shape) != 2 or logits.shape[0] != 1:
    shape = getattr(logits, "shape", type(logits).__name__)
    raise ValueError(
        "The model must return logits of shape [batch, classes]; on a batch of one "
        f"example it returned {shape}."
    )
  if not keras.backend.is_float_dtype(logits.dtype):
    dtype = keras.backend.standardize_dtype(logits.dtype)
    raise ValueError(f"The model must return float logits; got {dtype}.")
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}.")
  if labels.shape != (x.shape[0],):
    raise ValueError(
        f"labels must have shape [batch] = ({x.shape[0]},); got {labels.shape}."
    )
  num_classes = logits.shape[1]
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise ValueError(
        f"labels must be in [0, {num_classes}) (the model's classes); labels[{bad[0]}] "
        f"= {labels[bad[0]]}."
    )
  return ops.convert_to_tensor(labels, "int32"), num_classes


def check_float_inputs(x):
  """``x`` as a tensor after checking its dtype is floating."""
  x = ops.convert_to_tensor(x)
  if not keras.backend.is_float_dtype(x.dtype):
    dtype = keras.backend.standardize_dtype(x.dtype)
    raise ValueError(f"x must be a float tensor; got dtype {dtype}.")
  return x


def float32_inputs(x):
  """``x`` (a tensor of any dtype, a numpy array or nested lists) as float32.

  `tf.convert_to_tensor(x, tf.float32)` converts arrays and lists but raises
  ValueError for a tensor of another dtype (the float16 inputs of a model built
  with dtype="float16"); a cast converts all of them.
  """
  return ops.cast(x, "float32")


def float_inputs_and_labels(model, x, labels):
  """``(x as a float tensor, int32 labels)`` after checking both and the model."""
  x = check_float_inputs(x)
  labels, _ = check_logits_and_labels(model, x, labels)
  return x, labels
