"""Additive angular-margin softmax losses: AM-Softmax / CosFace and ArcFace.

Each loss comes as a function `(y_true, y_pred, ...) -> per-example loss` and a
`keras.losses.Loss` wrapping it (the `keras.losses` pattern). `y_pred` is
`cos(theta)`, `(N, C)`: the output of `tf_large_margin.layers.CosineHead` in its
default configuration (each class has `head_config`, the head's arguments).

| function     | class                     | target logit (s = scale, m = margin) |
|--------------|---------------------------|--------------------------------------|
| `am_softmax` | `AMSoftmax` (= `CosFace`) | `s (cos(theta_y) - m)`               |
| `arcface`    | `ArcFace`                 | `s cos(theta_y + m)`                 |

The other classes' logits are `s cos(theta_j)`; the loss is the softmax
cross-entropy of these logits. With `margin=0` both reduce to
`keras.losses.sparse_categorical_crossentropy(y, s * cos, from_logits=True)`.

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


def am_softmax(y_true, y_pred, margin=0.35, scale=30.0):
  """Additive-margin softmax (AM-Softmax / CosFace) loss.

  With `c_j = cos(theta_j)` (output of a normalised `CosineHead`):

  ```
  logit_j = s * c_j          for j != y
  logit_y = s * (c_y - m)
  loss    = -log softmax(logit)_y
  ```

  `margin=0, scale=1` gives plain softmax cross-entropy on `cos(theta)`.

  References:
      - Wang, Cheng, Liu & Liu, "Additive Margin Softmax for Face
        Verification", IEEE SPL 2018.
      - Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face
        Recognition", CVPR 2018.

  Args:
      y_true: Integer labels `(N,)`/`(N, 1)` or one-hot labels `(N, C)`.
      y_pred: `cos(theta)` of shape `(N, C)`.
      margin: Additive cosine margin `m >= 0`.
      scale: Scale `s > 0`.

  Returns:
      Per-example loss of shape `(N,)`.

  Example:

  >>> cos = np.array([[0.8, 0.3, -0.1], [0.2, 0.6, 0.1]], "float32")
  >>> loss = am_softmax([0, 2], cos, margin=0.35, scale=30.0)
  >>> [round(float(v), 3) for v in loss]
  [0.011, 25.5]
  """
  margin = check_real("margin", margin)
  scale = check_real("scale", scale, positive=True)
  cos = labels.working_precision(y_pred)
  one_hot = labels.one_hot_like(y_true, cos)
  target = labels.target_column(one_hot, cos) - margin
  return labels.softmax_xent(
      one_hot, scale * labels.replace_target(one_hot, cos, target)
  )


@keras.saving.register_keras_serializable(package="tf_large_margin")
class AMSoftmax(keras.losses.Loss):
  """Additive-margin softmax (AM-Softmax / CosFace) loss.

  ```
  logit_j = s * cos(theta_j)          for j != y
  logit_y = s * (cos(theta_y) - m)
  loss    = -log softmax(logit)_y
  ```

  Expects `y_pred = cos(theta)` from
  `tf_large_margin.layers.CosineHead(C)` (default normalisation).

  References: Wang et al., "Additive Margin Softmax for Face
  Verification", IEEE SPL 2018; Wang et al., "CosFace: Large Margin Cosine
  Loss for Deep Face Recognition", CVPR 2018.

  Args:
      margin: Additive cosine margin `m >= 0`. Default `0.35`.
      scale: Scale `s > 0`. Default `30.0`.
      reduction: Keras reduction, default `"sum_over_batch_size"`.
      name: Loss name.
      dtype: Loss computation dtype.

  Example:

  ```python
  model = keras.Sequential([keras.Input((32,)), CosineHead(10)])
  model.compile(optimizer="adam", loss=AMSoftmax(margin=0.35, scale=30.0))
  ```
  """

  head_config = {}  # CosineHead(C): cos(theta)

  def __init__(
      self,
      margin=0.35,
      scale=30.0,
      reduction="sum_over_batch_size",
      name="am_softmax",
      dtype=None,
  ):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.margin = check_real("margin", margin)
    self.scale = check_real("scale", scale, positive=True)

  def call(self, y_true, y_pred):
    return am_softmax(y_true, y_pred, margin=self.margin, scale=self.scale)

  def get_config(self):
    config = super().get_config()
    config.update({"margin": self.margin, "scale": self.scale})
    return config


CosFace = AMSoftmax
cosface = am_softmax


def arcface(y_true, y_pred, margin=0.5, scale=64.0):
  """Additive angular margin (ArcFace) loss.

  With `c_j = cos(theta_j)` (output of a normalised `CosineHead`):

  ```
  logit_j = s * c_j                          for j != y
  logit_y = s * cos(theta_y + m)             if theta_y + m < pi
                                             (i.e. c_y > cos(pi - m))
          = s * (c_y - m * sin(m))           otherwise
  loss    = -log softmax(logit)_y
  ```

  This is the usual `easy_margin=False` variant: when `theta_y + m` would
  exceed `pi`, `cos(theta_y + m)` stops being monotone in `theta_y`, so the
  target logit falls back to a CosFace-style penalty `c_y - m sin(m)`
  (`sin(pi - m) = sin(m)`). As in the reference implementation the target
  logit jumps at the switch point, from `cos(pi) = -1` to
  `-cos(m) - m sin(m)` (it keeps decreasing in `theta_y`).
  `cos(theta_y + m)` is evaluated as
  `c_y cos(m) - sqrt(max(1 - c_y^2, eps)) sin(m)` so the value and gradient
  stay finite at `c_y = +-1`.

  `margin=0, scale=1` gives plain softmax cross-entropy on `cos(theta)`.

  Reference: Deng, Guo, Xue & Zafeiriou, "ArcFace: Additive Angular Margin
  Loss for Deep Face Recognition", CVPR 2019.

  Args:
      y_true: Integer labels `(N,)`/`(N, 1)` or one-hot labels `(N, C)`.
      y_pred: `cos(theta)` of shape `(N, C)`.
      margin: Additive angular margin `m` in radians, `0 <= m < pi`.
      scale: Scale `s > 0`.

  Returns:
      Per-example loss of shape `(N,)`.

  Example:

  >>> cos = np.array([[0.8, 0.3, -0.1], [0.2, 0.6, 0.1]], "float32")
  >>> loss = arcface([0, 2], cos, margin=0.5, scale=64.0)
  >>> [round(float(v), 3) for v in loss]
  [0.001, 63.313]
  """
  margin = check_real("margin", margin, upper=math.pi)
  scale = check_real("scale", scale, positive=True)
  cos = labels.working_precision(y_pred)
  one_hot = labels.one_hot_like(y_true, cos)
  c_y = labels.target_column(one_hot, cos)
  eps = keras.config.epsilon()
  sin_y = ops.sqrt(labels.at_least(1.0 - ops.square(c_y), eps))
  cos_plus_m = c_y * math.cos(margin) - sin_y * math.sin(margin)
  fallback = c_y - margin * math.sin(margin)
  target = ops.where(ops.greater(c_y, math.cos(math.pi - margin)), cos_plus_m, fallback)
  return labels.softmax_xent(
      one_hot, scale * labels.replace_target(one_hot, cos, target)
  )


@keras.saving.register_keras_serializable(package="tf_large_margin")
class ArcFace(keras.losses.Loss):
  """Additive angular margin (ArcFace) loss.

  ```
  logit_j = s * cos(theta_j)                 for j != y
  logit_y = s * cos(theta_y + m)             if cos(theta_y) > cos(pi - m)
          = s * (cos(theta_y) - m sin(m))    otherwise ("easy_margin=False")
  loss    = -log softmax(logit)_y
  ```

  Expects `y_pred = cos(theta)` from
  `tf_large_margin.layers.CosineHead(C)` (default normalisation). See
  `arcface` for details.

  Reference: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep
  Face Recognition", CVPR 2019.

  Args:
      margin: Additive angular margin in radians, `0 <= m < pi`.
          Default `0.5`.
      scale: Scale `s > 0`. Default `64.0`.
      reduction: Keras reduction, default `"sum_over_batch_size"`.
      name: Loss name.
      dtype: Loss computation dtype.

  Example:

  ```python
  model = keras.Sequential([keras.Input((32,)), CosineHead(10)])
  model.compile(optimizer="adam", loss=ArcFace(margin=0.5, scale=64.0))
  ```
  """

  head_config = {}  # CosineHead(C): cos(theta)

  def __init__(
      self,
      margin=0.5,
      scale=64.0,
      reduction="sum_over_batch_size",
      name="arcface",
      dtype=None,
  ):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.margin = check_real("margin", margin, upper=math.pi)
    self.scale = check_real("scale", scale, positive=True)

  def call(self, y_true, y_pred):
    return arcface(y_true, y_pred, margin=self.margin, scale=self.scale)

  def get_config(self):
    config = super().get_config()
    config.update({"margin": self.margin, "scale": self.scale})
    return config
