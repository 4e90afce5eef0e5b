"""Output-space large-margin losses.

Each loss comes as a plain function `(y_true, y_pred, ...) -> per-example loss`
and a `keras.losses.Loss` subclass wrapping it (same pattern as
`keras.losses`):

| function            | class                       | `y_pred` (C classes)                  |
|---------------------|-----------------------------|---------------------------------------|
| `multiclass_hinge`  | `MulticlassHinge`           | scores `z`, `(N, C)`                  |
| `am_softmax`        | `AMSoftmax` (= `CosFace`)   | `cos(theta)`, `(N, C)`                |
| `arcface`           | `ArcFace`                   | `cos(theta)`, `(N, C)`                |
| `l_softmax`         | `LSoftmax`                  | `[cos(theta), ||w_j|| ||x||]`, `(N, 2C)` |
| `sphereface`        | `SphereFace` (= `ASoftmax`) | `[cos(theta), ||x||]`, `(N, 2C)`        |

`cos(theta)` inputs are the output of `tf_large_margin.layers.CosineHead`
(default configuration). The `(N, 2C)` inputs are the output of
`CosineHead(..., normalize_features=False, return_norms=True)`, with
`normalize_weights=False` for `LSoftmax` and `normalize_weights=True` for
`SphereFace`: the first `C` columns are `cos(theta_j)`, the last `C` columns
the factor `scale_j` such that the ordinary logit is `z_j = scale_j *
cos(theta_j)`. Use `tf_large_margin.layers.head_output_logits` to get `z`
(e.g. for accuracy / `argmax`).

Each loss class has a class attribute `head_config`: the `CosineHead`
arguments (besides `units`) of the head whose output it expects, so a model can
be built as `CosineHead(num_classes, **loss.head_config)`.

Labels (`y_true`) may be integer class ids of shape `(N,)` or `(N, 1)` or
one-hot vectors of shape `(N, C)`; integer labels given as floats (as Keras
does when it casts `y_true` to the loss dtype) are accepted. Labels must be
hard labels: one-hot rows are interpreted through `y_true > 0.5`.

The softmax losses reduce to plain softmax cross-entropy on the logits
`scale * cos(theta)` when the margin vanishes (`margin=0` for `AMSoftmax`,
`ArcFace`; `m=1` for `LSoftmax`, `SphereFace`), i.e. to
`keras.losses.sparse_categorical_crossentropy(y, s * cos, from_logits=True)`.
"""

import math
import numbers

import keras
from keras import ops

from tf_large_margin.labels import to_one_hot
from tf_large_margin.layers import split_head_output

_HINGE_VARIANTS = ("crammer_singer", "weston_watkins")


# --------------------------------------------------------------------------
# Validation and label helpers
# --------------------------------------------------------------------------


def _check_real(name, value, *, positive=False, upper=None):
  """Validates a finite real hyper-parameter (>= 0, or > 0, optionally < upper)."""
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


def _check_multiplicative_margin(m):
  """Validates the integer angular margin `m >= 1` of L-Softmax / SphereFace."""
  ok = (
      not isinstance(m, bool)
      and isinstance(m, numbers.Real)
      and math.isfinite(m)
      and float(m).is_integer()
      and m >= 1
  )
  if not ok:
    raise ValueError(
        "The angular margin `m` is out of range: it must be an integer "
        f">= 1 (m=1 means no margin), got m={m!r}."
    )
  return int(m)


def _check_variant(variant):
  if variant not in _HINGE_VARIANTS:
    raise ValueError(
        f"Unknown hinge `variant`={variant!r}; expected one of {_HINGE_VARIANTS}."
    )
  return variant


def _one_hot_like(y_true, scores):
  num_classes = scores.shape[-1]
  if num_classes is None:
    raise ValueError(
        "The number of classes (last dimension of y_pred) must be statically known."
    )
  return to_one_hot(y_true, num_classes, len(scores.shape), dtype=scores.dtype)


def _replace_target(one_hot, values, target_values):
  """`values` with the target column replaced by `target_values[..., None]`."""
  return ops.where(
      ops.greater(one_hot, 0.5), ops.expand_dims(target_values, -1), values
  )


def _target_column(one_hot, values):
  return ops.sum(one_hot * values, axis=-1)


def _softmax_xent(one_hot, logits):
  return ops.categorical_crossentropy(one_hot, logits, from_logits=True)


# --------------------------------------------------------------------------
# Multi-class hinge
# --------------------------------------------------------------------------


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
  >>> multiclass_hinge(y_true, y_pred)  # [0.5, 1.2]
  """
  variant = _check_variant(variant)
  margin = _check_real("margin", margin)
  y_pred = ops.convert_to_tensor(y_pred)
  one_hot = _one_hot_like(y_true, y_pred)
  z_y = _target_column(one_hot, y_pred)
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
    self.margin = _check_real("margin", margin)
    self.cross_entropy_weight = _check_real(
        "cross_entropy_weight", cross_entropy_weight
    )

  def call(self, y_true, y_pred):
    loss = multiclass_hinge(y_true, y_pred, variant=self.variant, margin=self.margin)
    if self.cross_entropy_weight:
      one_hot = _one_hot_like(y_true, y_pred)
      loss += self.cross_entropy_weight * _softmax_xent(one_hot, y_pred)
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


# --------------------------------------------------------------------------
# AM-Softmax / CosFace
# --------------------------------------------------------------------------


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

  >>> cos = CosineHead(10)(features)
  >>> loss = am_softmax(labels, cos, margin=0.35, scale=30.0)
  """
  margin = _check_real("margin", margin)
  scale = _check_real("scale", scale, positive=True)
  cos = ops.convert_to_tensor(y_pred)
  one_hot = _one_hot_like(y_true, cos)
  target = _target_column(one_hot, cos) - margin
  return _softmax_xent(one_hot, scale * _replace_target(one_hot, cos, target))


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
    self.margin = _check_real("margin", margin)
    self.scale = _check_real("scale", scale, positive=True)

  def call(self, y_true, y_pred):
    return am_softmax(y_true, y_pred, margin=self.margin, scale=self.scale)

  def get_config(self):
    config = super().get_config()
    config.update({"margin": self.margin, "scale": self.scale})
    return config


CosFace = AMSoftmax
cosface = am_softmax


# --------------------------------------------------------------------------
# ArcFace
# --------------------------------------------------------------------------


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

  >>> cos = CosineHead(10)(features)
  >>> loss = arcface(labels, cos, margin=0.5, scale=64.0)
  """
  margin = _check_real("margin", margin, upper=math.pi)
  scale = _check_real("scale", scale, positive=True)
  cos = ops.convert_to_tensor(y_pred)
  one_hot = _one_hot_like(y_true, cos)
  c_y = _target_column(one_hot, cos)
  eps = keras.config.epsilon()
  sin_y = ops.sqrt(ops.maximum(1.0 - ops.square(c_y), eps))
  cos_plus_m = c_y * math.cos(margin) - sin_y * math.sin(margin)
  fallback = c_y - margin * math.sin(margin)
  target = ops.where(ops.greater(c_y, math.cos(math.pi - margin)), cos_plus_m, fallback)
  return _softmax_xent(one_hot, scale * _replace_target(one_hot, cos, target))


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
    self.margin = _check_real("margin", margin, upper=math.pi)
    self.scale = _check_real("scale", scale, positive=True)

  def call(self, y_true, y_pred):
    return arcface(y_true, y_pred, margin=self.margin, scale=self.scale)

  def get_config(self):
    config = super().get_config()
    config.update({"margin": self.margin, "scale": self.scale})
    return config


# --------------------------------------------------------------------------
# L-Softmax / A-Softmax (SphereFace)
# --------------------------------------------------------------------------


def _chebyshev(c, m):
  """`T_m(c) = cos(m * arccos(c))` by the three-term recurrence."""
  t_prev, t_cur = ops.ones_like(c), c
  for _ in range(m - 1):
    t_prev, t_cur = t_cur, 2.0 * c * t_cur - t_prev
  return t_cur


def _psi(c, m):
  """`psi(theta) = (-1)^k cos(m theta) - 2k` for `theta in [k pi/m, (k+1) pi/m]`.

  Computed from `c = cos(theta)` without `arccos`: `k` is the number of
  interval boundaries `cos(j pi / m)`, `j = 1..m-1`, with `c <= cos(j pi/m)`,
  and `cos(m theta) = T_m(c)` (Chebyshev). The result is a polynomial in `c`
  on each interval, so it and its gradient are finite everywhere, including
  `theta = 0` and `theta = pi`. `psi` is continuous and decreasing from `1`
  (theta = 0) to `1 - 2m` (theta = pi).
  """
  k = ops.zeros_like(c)
  for j in range(1, m):
    k = k + ops.cast(ops.less_equal(c, math.cos(j * math.pi / m)), c.dtype)
  sign = 1.0 - 2.0 * (k - 2.0 * ops.floor(k / 2.0))  # (-1)^k
  return sign * _chebyshev(c, m) - 2.0 * k


def l_softmax(y_true, y_pred, m=2):
  """Large-margin softmax (L-Softmax) loss.

  With `z_j = ||w_j|| ||x|| cos(theta_j)`:

  ```
  logit_j = ||w_j|| ||x|| cos(theta_j)       for j != y
  logit_y = ||w_y|| ||x|| psi(theta_y)
  psi(theta) = (-1)^k cos(m theta) - 2k,  theta in [k pi/m, (k+1) pi/m],
               k = 0..m-1
  loss    = -log softmax(logit)_y
  ```

  Interface: `y_pred` has shape `(N, 2C)` and is `concat([cos, norms])`
  where `cos[:, j] = cos(theta_j)` and `norms[:, j] = ||w_j|| ||x||`, i.e. the
  output of `CosineHead(C, normalize_features=False,
  normalize_weights=False, return_norms=True)`. `psi` is computed from
  `cos(theta_y)` with Chebyshev polynomials (no `arccos`), so value and
  gradient are finite for `cos(theta_y)` in `[-1, 1]`.

  `m=1` gives plain softmax cross-entropy on the logits `norms * cos`.
  The paper's optional annealing (`(lambda z_y + psi-logit) / (1 + lambda)`)
  is not included.

  Reference: Liu, Wen, Yu & Yang, "Large-Margin Softmax Loss for
  Convolutional Neural Networks", ICML 2016.

  Args:
      y_true: Integer labels `(N,)`/`(N, 1)` or one-hot labels `(N, C)`.
      y_pred: `concat([cos(theta), ||w_j|| ||x||])`, shape `(N, 2C)`.
      m: Integer angular margin `m >= 1`.

  Returns:
      Per-example loss of shape `(N,)`.

  Example:

  >>> head = CosineHead(10, normalize_features=False,
  ...                   normalize_weights=False, return_norms=True)
  >>> loss = l_softmax(labels, head(features), m=2)
  """
  m = _check_multiplicative_margin(m)
  cos, norms = split_head_output(y_pred)
  one_hot = _one_hot_like(y_true, cos)
  psi_y = _psi(_target_column(one_hot, cos), m)
  angular = _replace_target(one_hot, cos, psi_y)
  return _softmax_xent(one_hot, norms * angular)


def sphereface(y_true, y_pred, m=4):
  """A-Softmax (SphereFace) loss: L-Softmax with normalised weights.

  ```
  logit_j = ||x|| cos(theta_j)       for j != y
  logit_y = ||x|| psi(theta_y)       (psi as in `l_softmax`)
  loss    = -log softmax(logit)_y
  ```

  Interface: `y_pred` has shape `(N, 2C)` and is `concat([cos, norms])`
  with `norms[:, j] = ||x||`, i.e. the output of `CosineHead(C,
  normalize_features=False, normalize_weights=True, return_norms=True)`.
  The computation is that of `l_softmax`; the weight normalisation
  (`||w_j|| = 1`) is the head's job.

  `m=1` gives plain softmax cross-entropy on `||x|| cos(theta)`.

  Reference: Liu, Wen, Yu, Li, Raj & Song, "SphereFace: Deep Hypersphere
  Embedding for Face Recognition", CVPR 2017.

  Args:
      y_true: Integer labels `(N,)`/`(N, 1)` or one-hot labels `(N, C)`.
      y_pred: `concat([cos(theta), ||x||])`, shape `(N, 2C)`.
      m: Integer angular margin `m >= 1`.

  Returns:
      Per-example loss of shape `(N,)`.

  Example:

  >>> head = CosineHead(10, normalize_features=False, return_norms=True)
  >>> loss = sphereface(labels, head(features), m=4)
  """
  return l_softmax(y_true, y_pred, m=m)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class LSoftmax(keras.losses.Loss):
  """Large-margin softmax (L-Softmax) loss.

  ```
  logit_j = ||w_j|| ||x|| cos(theta_j)       for j != y
  logit_y = ||w_y|| ||x|| psi(theta_y)
  psi(theta) = (-1)^k cos(m theta) - 2k,  theta in [k pi/m, (k+1) pi/m]
  ```

  Expects `y_pred = concat([cos(theta), ||w_j|| ||x||])` of shape
  `(N, 2C)`, the output of `CosineHead(C, normalize_features=False,
  normalize_weights=False, return_norms=True)`. See `l_softmax`.

  Reference: Liu et al., "Large-Margin Softmax Loss for Convolutional
  Neural Networks", ICML 2016.

  Args:
      m: Integer angular margin `m >= 1` (`1` = plain softmax). Default `2`.
      reduction: Keras reduction, default `"sum_over_batch_size"`.
      name: Loss name.
      dtype: Loss computation dtype.

  Example:

  ```python
  head = CosineHead(10, normalize_features=False, normalize_weights=False,
                    return_norms=True)
  model = keras.Sequential([keras.Input((32,)), head])
  model.compile(optimizer="adam", loss=LSoftmax(m=2))
  logits = tf_large_margin.layers.head_output_logits(model.predict(x))
  ```
  """

  head_config = {
      "normalize_features": False,
      "normalize_weights": False,
      "return_norms": True,
  }

  def __init__(
      self,
      m=2,
      reduction="sum_over_batch_size",
      name="l_softmax",
      dtype=None,
  ):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.m = _check_multiplicative_margin(m)

  def call(self, y_true, y_pred):
    return l_softmax(y_true, y_pred, m=self.m)

  def get_config(self):
    config = super().get_config()
    config.update({"m": self.m})
    return config


@keras.saving.register_keras_serializable(package="tf_large_margin")
class SphereFace(LSoftmax):
  """A-Softmax (SphereFace) loss: L-Softmax with normalised weights.

  ```
  logit_j = ||x|| cos(theta_j)       for j != y
  logit_y = ||x|| psi(theta_y)       (psi as in `LSoftmax`)
  ```

  Expects `y_pred = concat([cos(theta), ||x||])` of shape `(N, 2C)`, the
  output of `CosineHead(C, normalize_features=False,
  normalize_weights=True, return_norms=True)`. See `sphereface`.

  Reference: Liu et al., "SphereFace: Deep Hypersphere Embedding for Face
  Recognition", CVPR 2017.

  Args:
      m: Integer angular margin `m >= 1` (`1` = plain softmax). Default `4`.
      reduction: Keras reduction, default `"sum_over_batch_size"`.
      name: Loss name.
      dtype: Loss computation dtype.

  Example:

  ```python
  head = CosineHead(10, normalize_features=False, return_norms=True)
  model = keras.Sequential([keras.Input((32,)), head])
  model.compile(optimizer="adam", loss=SphereFace(m=4))
  ```
  """

  head_config = {"normalize_features": False, "return_norms": True}

  def __init__(
      self,
      m=4,
      reduction="sum_over_batch_size",
      name="sphereface",
      dtype=None,
  ):
    super().__init__(m=m, reduction=reduction, name=name, dtype=dtype)

  def call(self, y_true, y_pred):
    return sphereface(y_true, y_pred, m=self.m)


ASoftmax = SphereFace
