"""Multi-class hinge loss on the scores (an output-space margin loss).

`multiclass_hinge(y_true, y_pred, variant, margin)` -> per-example loss, and the
`keras.losses.Loss` wrapper `MulticlassHinge` (the `keras.losses` pattern). With
scores z `(N, C)` and target class y:

    crammer_singer:  loss = max(0, margin + max_{j != y} z_j - z_y)
    weston_watkins:  loss = sum_{j != y} max(0, margin - (z_y - z_j))

Labels (`y_true`) may be integer class ids of shape `(N,)` or `(N, 1)` or
one-hot vectors of shape `(N, C)`; integer labels given as floats (as Keras
does when it casts `y_true` to the loss dtype) are accepted. Labels must be
hard labels: one-hot rows are interpreted through `y_true > 0.5`.

Half-precision `y_pred` (float16, bfloat16) is widened to float32 and the loss is
computed and returned in float32, so margins, scales and logits beyond float16's
range (65504) stay finite.
"""

import math

import keras
from keras import ops

from tf_large_margin import labels
from tf_large_margin.argument_checks import check_real

_HINGE_VARIANTS = ("crammer_singer", "weston_watkins")


def _check_variant(variant):
  if variant not in _HINGE_VARIANTS:
    raise ValueError(
        f"Unknown hinge `variant`={variant!r}; expected one of {_HINGE_VARIANTS}."
    )
  return variant


def multiclass_hinge(y_true, y_pred, variant="crammer_singer", margin=1.0):
  """Multi-class hinge loss (Crammer-Singer or Weston-Watkins).

  With scores `z` and target class `y`:

  ```
  crammer_singer:  loss = max(0, margin + max_{j != y} z_j - z_y)
  weston_watkins:  loss = sum_{j != y} max(0, margin - (z_y - z_j))
  ```

  References:
      - Crammer & Singer, "On the Algorithmic Implementation of Multiclass
        Kernel-based Vector Machines", JMLR 2001.
      - Weston & Watkins, "Support Vector Machines for Multi-Class Pattern
        Recognition", ESANN 1999.

  Args:
      y_true: Integer labels `(N,)`/`(N, 1)` or one-hot labels `(N, C)`.
      y_pred: Scores `(N, C)` (unnormalised logits).
      variant: `"crammer_singer"` or `"weston_watkins"`.
      margin: Non-negative margin.

  Returns:
      Per-example loss of shape `(N,)`.

  Example:

  >>> y_true = np.array([0, 2])
  >>> y_pred = np.array([[2.0, 1.5, 0.0], [0.3, 0.2, 0.1]])
  >>> [round(float(v), 3) for v in multiclass_hinge(y_true, y_pred)]
  [0.5, 1.2]
  """
  variant = _check_variant(variant)
  margin = check_real("margin", margin)
  y_pred = labels.working_precision(y_pred)
  one_hot = labels.one_hot_like(y_true, y_pred)
  z_y = labels.target_column(one_hot, y_pred)
  if variant == "weston_watkins":
    violations = ops.relu(margin - ops.expand_dims(z_y, -1) + y_pred)
    return ops.sum((1.0 - one_hot) * violations, axis=-1)
  others = ops.where(
      ops.greater(one_hot, 0.5), ops.full_like(y_pred, -math.inf), y_pred
  )
  return ops.relu(margin + ops.max(others, axis=-1) - z_y)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class MulticlassHinge(keras.losses.Loss):
  """Multi-class hinge loss (Crammer-Singer or Weston-Watkins).

  ```
  crammer_singer:  loss = max(0, margin + max_{j != y} z_j - z_y)
  weston_watkins:  loss = sum_{j != y} max(0, margin - (z_y - z_j))
  ```

  References: Crammer & Singer, JMLR 2001; Weston & Watkins, ESANN 1999.

  Args:
      variant: `"crammer_singer"` (default) or `"weston_watkins"`.
      margin: Non-negative margin. Default `1.0`.
      cross_entropy_weight: weight of a softmax cross-entropy added to the
          hinge (the paper's second baseline: hinge + a small cross-entropy
          weight). Default `0.0`.
      reduction: Keras reduction, default `"sum_over_batch_size"`.
      name: Loss name.
      dtype: Loss computation dtype.

  Example:

  ```python
  model.compile(optimizer="adam",
                loss=MulticlassHinge(variant="weston_watkins", margin=1.0))
  ```
  """

  def __init__(
      self,
      variant="crammer_singer",
      margin=1.0,
      cross_entropy_weight=0.0,
      reduction="sum_over_batch_size",
      name="multiclass_hinge",
      dtype=None,
  ):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.variant = _check_variant(variant)
    self.margin = check_real("margin", margin)
    self.cross_entropy_weight = check_real("cross_entropy_weight", cross_entropy_weight)

  def call(self, y_true, y_pred):
    y_pred = labels.working_precision(y_pred)
    loss = multiclass_hinge(y_true, y_pred, variant=self.variant, margin=self.margin)
    if self.cross_entropy_weight:
      one_hot = labels.one_hot_like(y_true, y_pred)
      loss = loss + self.cross_entropy_weight * labels.softmax_xent(one_hot, y_pred)
    return loss

  def get_config(self):
    config = super().get_config()
    config.update(
        {
            "variant": self.variant,
            "margin": self.margin,
            "cross_entropy_weight": self.cross_entropy_weight,
        }
    )
    return config
