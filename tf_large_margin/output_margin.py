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

`LSoftmax` and `SphereFace` take the papers' optional annealing weight
`lambda_` (a number, or a schedule of the training step such as `LambdaDecay`;
the `LambdaScheduler` callback advances the step during `fit`):

| schedule / callback | role                                                         |
|---------------------|--------------------------------------------------------------|
| `LambdaDecay`       | `lambda(step) = max(lambda_min, base (1 + gamma step)^-power)` |
| `LambdaScheduler`   | `keras.callbacks.Callback` keeping the losses' `step` equal to `model.optimizer.iterations` |

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

Half-precision `y_pred` (float16, bfloat16) is widened to float32 and the loss is
computed and returned in float32, so margins, scales and logits beyond float16's
range (65504) stay finite.
"""

import math
import numbers

import keras
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

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


def _working_precision(y_pred):
  """``y_pred`` as a tensor, half precision (float16, bfloat16) widened to float32."""
  y_pred = ops.convert_to_tensor(y_pred)
  if keras.backend.standardize_dtype(y_pred.dtype) in ("float16", "bfloat16"):
    return ops.cast(y_pred, "float32")
  return y_pred


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
  y_pred = _working_precision(y_pred)
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
    y_pred = _working_precision(y_pred)
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
  cos = _working_precision(y_pred)
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
  cos = _working_precision(y_pred)
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
# Annealing weight lambda of L-Softmax / SphereFace
# --------------------------------------------------------------------------


def _check_lambda(lambda_):
  """Validates `lambda_`: a number `>= 0` or a `LearningRateSchedule`."""
  if isinstance(lambda_, LearningRateSchedule):
    return lambda_
  if isinstance(lambda_, bool) or not isinstance(lambda_, numbers.Real):
    raise ValueError(
        "`lambda_` must be a non-negative number or a schedule of the training "
        "step (a keras.optimizers.schedules.LearningRateSchedule such as "
        f"tf_large_margin.output_margin.LambdaDecay), got lambda_={lambda_!r}."
    )
  return _check_real("lambda_", lambda_)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class LambdaDecay(LearningRateSchedule):
  """Decay of the L-Softmax / SphereFace annealing weight `lambda`.

  ```
  lambda(step) = max(lambda_min, base * (1 + gamma * step)^(-power))
  ```

  with `step` the number of training steps done (`optimizer.iterations`).
  This is the form of the decay in the reference implementation of
  SphereFace (Liu et al., CVPR 2017; L-Softmax, Liu et al., ICML 2016, anneals
  with a decay of the same kind), which moves the target logit from the plain
  softmax one (`lambda` large) towards the margin one (`lambda` small); see
  `LSoftmax`. The defaults are SphereFace's (`base=1000, gamma=0.12, power=1,
  lambda_min=5`).

  It is a `keras.optimizers.schedules.LearningRateSchedule` (a serialisable
  function of the step), so any Keras schedule (e.g. `PiecewiseConstantDecay`)
  can be given as `lambda_` instead.

  Args:
      base: `lambda` at step 0, `>= 0`. Default `1000.0`.
      gamma: Decay rate per step, `>= 0`. Default `0.12`.
      power: Exponent, `>= 0`. Default `1.0`.
      lambda_min: Floor of `lambda`, `0 <= lambda_min <= base`. Default `5.0`.

  Example:

  >>> schedule = LambdaDecay()  # SphereFace's
  >>> [float(schedule(step)) for step in (0, 100, 10_000)]  # [1000, 76.9, 5]
  """

  def __init__(self, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
    self.base = _check_real("base", base)
    self.gamma = _check_real("gamma", gamma)
    self.power = _check_real("power", power)
    self.lambda_min = _check_real("lambda_min", lambda_min)
    if self.lambda_min > self.base:
      raise ValueError(
          f"`lambda_min`={lambda_min!r} must not exceed `base`={base!r} "
          "(lambda would be constant)."
      )

  def __call__(self, step):
    step = ops.cast(step, "float32")
    decayed = self.base * ops.power(1.0 + self.gamma * step, -self.power)
    return ops.maximum(decayed, self.lambda_min)

  def get_config(self):
    return {
        "base": self.base,
        "gamma": self.gamma,
        "power": self.power,
        "lambda_min": self.lambda_min,
    }


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


def l_softmax(y_true, y_pred, m=2, lambda_=0.0):
  """Large-margin softmax (L-Softmax) loss.

  With `z_j = ||w_j|| ||x|| cos(theta_j)`:

  ```
  logit_j = ||w_j|| ||x|| cos(theta_j)       for j != y
  logit_y = ||w_y|| ||x|| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)
  psi(theta) = (-1)^k cos(m theta) - 2k,  theta in [k pi/m, (k+1) pi/m],
               k = 0..m-1
  loss    = -log softmax(logit)_y
  ```

  `lambda` is the paper's annealing weight: `lambda = 0` (the default) is the
  L-Softmax loss proper, `lambda -> infinity` plain softmax cross-entropy on
  the logits `z`. The paper trains with a large `lambda` decreased over
  training (see `LSoftmax`, `LambdaDecay`). The target logit is evaluated as
  `z-scale * (cos + (psi - cos) / (1 + lambda))`, which is the formula above
  and stays accurate for large `lambda`.

  Interface: `y_pred` has shape `(N, 2C)` and is `concat([cos, norms])`
  where `cos[:, j] = cos(theta_j)` and `norms[:, j] = ||w_j|| ||x||`, i.e. the
  output of `CosineHead(C, normalize_features=False,
  normalize_weights=False, return_norms=True)`. `psi` is computed from
  `cos(theta_y)` with Chebyshev polynomials (no `arccos`), so value and
  gradient are finite for `cos(theta_y)` in `[-1, 1]`.

  `m=1` gives plain softmax cross-entropy on the logits `norms * cos` (for
  any `lambda`).

  Reference: Liu, Wen, Yu & Yang, "Large-Margin Softmax Loss for
  Convolutional Neural Networks", ICML 2016.

  Args:
      y_true: Integer labels `(N,)`/`(N, 1)` or one-hot labels `(N, C)`.
      y_pred: `concat([cos(theta), ||w_j|| ||x||])`, shape `(N, 2C)`.
      m: Integer angular margin `m >= 1`.
      lambda_: Annealing weight `lambda >= 0`: a number, or a scalar tensor
          (e.g. a schedule's value at the current step). Default `0.0`.

  Returns:
      Per-example loss of shape `(N,)`.

  Example:

  >>> head = CosineHead(10, normalize_features=False,
  ...                   normalize_weights=False, return_norms=True)
  >>> loss = l_softmax(labels, head(features), m=2, lambda_=10.0)
  """
  m = _check_multiplicative_margin(m)
  if not (ops.is_tensor(lambda_) or isinstance(lambda_, keras.Variable)):
    lambda_ = _check_lambda(lambda_)
  if isinstance(lambda_, LearningRateSchedule):
    raise ValueError(
        "`l_softmax` / `sphereface` take the value of lambda, not a schedule; "
        "use the `LSoftmax` / `SphereFace` loss classes for a schedule."
    )
  cos, norms = split_head_output(_working_precision(y_pred))
  one_hot = _one_hot_like(y_true, cos)
  cos_y = _target_column(one_hot, cos)
  psi_y = _psi(cos_y, m)
  if not (isinstance(lambda_, float) and lambda_ == 0.0):
    lambda_ = ops.cast(lambda_, cos.dtype)
    psi_y = cos_y + (psi_y - cos_y) / (1.0 + lambda_)
  angular = _replace_target(one_hot, cos, psi_y)
  return _softmax_xent(one_hot, norms * angular)


def sphereface(y_true, y_pred, m=4, lambda_=0.0):
  """A-Softmax (SphereFace) loss: L-Softmax with normalised weights.

  ```
  logit_j = ||x|| cos(theta_j)       for j != y
  logit_y = ||x|| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)
  loss    = -log softmax(logit)_y
  ```

  (`psi` and the annealing weight `lambda` as in `l_softmax`; `lambda = 0`
  is A-Softmax proper.)

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
      lambda_: Annealing weight `lambda >= 0` (number or scalar tensor).
          Default `0.0`.

  Returns:
      Per-example loss of shape `(N,)`.

  Example:

  >>> head = CosineHead(10, normalize_features=False, return_norms=True)
  >>> loss = sphereface(labels, head(features), m=4)
  """
  return l_softmax(y_true, y_pred, m=m, lambda_=lambda_)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class LSoftmax(keras.losses.Loss):
  """Large-margin softmax (L-Softmax) loss, with optional lambda annealing.

  ```
  logit_j = ||w_j|| ||x|| cos(theta_j)       for j != y
  logit_y = ||w_y|| ||x|| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)
  psi(theta) = (-1)^k cos(m theta) - 2k,  theta in [k pi/m, (k+1) pi/m]
  ```

  Expects `y_pred = concat([cos(theta), ||w_j|| ||x||])` of shape
  `(N, 2C)`, the output of `CosineHead(C, normalize_features=False,
  normalize_weights=False, return_norms=True)`. See `l_softmax`.

  Annealing: the paper notes that the loss is hard to optimise from scratch
  and trains with the target logit above, `lambda` starting large (the
  plain softmax logit) and decreasing over training. `LambdaDecay` gives
  the decay `lambda = max(lambda_min, base (1 + gamma
  iteration)^(-power))` of the SphereFace reference implementation.
  `lambda_=0` (the default) is the loss without annealing. A schedule
  `lambda_` is evaluated at the loss's non-trainable variable `step`
  (`current_lambda()`); during `fit`, the `LambdaScheduler` callback keeps
  `step` equal to `model.optimizer.iterations`. Without the callback `step`
  stays 0. `step` is not part of the config: a loaded model's loss starts
  at 0 and the callback resynchronises it when training resumes.

  Reference: Liu et al., "Large-Margin Softmax Loss for Convolutional
  Neural Networks", ICML 2016.

  Args:
      m: Integer angular margin `m >= 1` (`1` = plain softmax). Default `2`.
      lambda_: Annealing weight `lambda >= 0`: a number, or a schedule of the
          training step (`LambdaDecay` or any
          `keras.optimizers.schedules.LearningRateSchedule`, whose values
          must be `>= 0`). Default `0.0` (no annealing).
      reduction: Keras reduction, default `"sum_over_batch_size"`.
      name: Loss name.
      dtype: Loss computation dtype.

  Example:

  ```python
  head = CosineHead(10, normalize_features=False, normalize_weights=False,
                    return_norms=True)
  model = keras.Sequential([keras.Input((32,)), head])
  model.compile(optimizer="adam", loss=LSoftmax(m=2, lambda_=LambdaDecay()))
  model.fit(x, y, callbacks=[LambdaScheduler()])
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
      lambda_=0.0,
      reduction="sum_over_batch_size",
      name="l_softmax",
      dtype=None,
  ):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.m = _check_multiplicative_margin(m)
    self.lambda_ = _check_lambda(lambda_)
    self.step = None
    if isinstance(self.lambda_, LearningRateSchedule):
      self.step = keras.Variable(
          0, dtype="int64", trainable=False, name=f"{self.name}_lambda_step"
      )

  def current_lambda(self):
    """`lambda_`, or the schedule's value at `step` (a scalar tensor)."""
    if self.step is None:
      return self.lambda_
    return self.lambda_(self.step)

  def call(self, y_true, y_pred):
    return l_softmax(y_true, y_pred, m=self.m, lambda_=self.current_lambda())

  def get_config(self):
    config = super().get_config()
    lambda_ = self.lambda_
    if isinstance(lambda_, LearningRateSchedule):
      lambda_ = keras.optimizers.schedules.serialize(lambda_)
    config.update({"m": self.m, "lambda_": lambda_})
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    if isinstance(config.get("lambda_"), dict):
      config["lambda_"] = keras.optimizers.schedules.deserialize(config["lambda_"])
    return cls(**config)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class SphereFace(LSoftmax):
  """A-Softmax (SphereFace) loss: L-Softmax with normalised weights.

  ```
  logit_j = ||x|| cos(theta_j)       for j != y
  logit_y = ||x|| (lambda cos(theta_y) + psi(theta_y)) / (1 + lambda)
  ```

  (`psi` as in `LSoftmax`.) Expects `y_pred = concat([cos(theta), ||x||])`
  of shape `(N, 2C)`, the output of `CosineHead(C, normalize_features=False,
  normalize_weights=True, return_norms=True)`. See `sphereface`.

  Annealing: as `LSoftmax` (`lambda_`, `LambdaDecay`, `LambdaScheduler`).
  The SphereFace reference implementation anneals with
  `lambda = max(5, 1000 (1 + 0.12 iteration)^(-1))`, `LambdaDecay()`'s
  defaults. `lambda_=0` (the default) is A-Softmax without annealing.

  Reference: Liu et al., "SphereFace: Deep Hypersphere Embedding for Face
  Recognition", CVPR 2017.

  Args:
      m: Integer angular margin `m >= 1` (`1` = plain softmax). Default `4`.
      lambda_: Annealing weight `lambda >= 0`, a number or a schedule of the
          training step (see `LSoftmax`). Default `0.0`.
      reduction: Keras reduction, default `"sum_over_batch_size"`.
      name: Loss name.
      dtype: Loss computation dtype.

  Example:

  ```python
  head = CosineHead(10, normalize_features=False, return_norms=True)
  model = keras.Sequential([keras.Input((32,)), head])
  model.compile(optimizer="adam", loss=SphereFace(m=4, lambda_=LambdaDecay()))
  model.fit(x, y, callbacks=[LambdaScheduler()])
  ```
  """

  head_config = {"normalize_features": False, "return_norms": True}

  def __init__(
      self,
      m=4,
      lambda_=0.0,
      reduction="sum_over_batch_size",
      name="sphereface",
      dtype=None,
  ):
    super().__init__(m=m, lambda_=lambda_, reduction=reduction, name=name, dtype=dtype)

  def call(self, y_true, y_pred):
    return sphereface(y_true, y_pred, m=self.m, lambda_=self.current_lambda())


ASoftmax = SphereFace
