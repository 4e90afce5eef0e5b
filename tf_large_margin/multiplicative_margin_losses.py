"""Multiplicative angular-margin softmax losses: L-Softmax and A-Softmax (SphereFace).

Each loss comes as a function `(y_true, y_pred, ...) -> per-example loss` and a
`keras.losses.Loss` wrapping it: `l_softmax` / `LSoftmax` and `sphereface` /
`SphereFace` (= `ASoftmax`). The target logit replaces `cos(theta_y)` by
`psi(theta_y) = (-1)^k cos(m theta_y) - 2k` (theta in [k pi/m, (k+1) pi/m]),
optionally blended with `cos(theta_y)` by the annealing weight `lambda_` (a number,
or a schedule of the training step such as `tf_large_margin.schedules.LambdaDecay`,
advanced during `fit` by `tf_large_margin.callbacks.LambdaScheduler`).

`y_pred` is `(N, 2C)`, the output of `CosineHead(..., normalize_features=False,
return_norms=True)` with `normalize_weights=False` for `LSoftmax` and `True` for
`SphereFace`: the first `C` columns are `cos(theta_j)`, the last `C` columns the
factor `scale_j` such that the ordinary logit is `z_j = scale_j cos(theta_j)`
(`tf_large_margin.layers.head_output_logits` gives `z`). With `m=1` both reduce to
softmax cross-entropy on `z`.

Labels (`y_true`) may be integer class ids of shape `(N,)` or `(N, 1)` or
one-hot vectors of shape `(N, C)`; integer labels given as floats (as Keras
does when it casts `y_true` to the loss dtype) are accepted. Labels must be
hard labels: one-hot rows are interpreted through `y_true > 0.5`.

Half-precision `y_pred` (float16, bfloat16) is widened to float32 and the loss is
computed and returned in float32, so margins, scales and logits beyond float16's
range (65504) stay finite.
"""

import math
import numbers

import keras
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

from tf_large_margin import labels
from tf_large_margin.layers import split_head_output
from tf_large_margin.schedules import check_lambda


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

  >>> head_output = np.array([[0.8, 0.3, -0.1, 2.0, 1.0, 1.5]], "float32")
  >>> [round(float(l_softmax([0], head_output, m=m)[0]), 3) for m in (1, 2)]
  [0.369, 0.817]
  >>> round(float(l_softmax([0], head_output, m=2, lambda_=10.0)[0]), 3)
  0.399
  """
  m = _check_multiplicative_margin(m)
  if not (ops.is_tensor(lambda_) or isinstance(lambda_, keras.Variable)):
    lambda_ = check_lambda(lambda_)
  if isinstance(lambda_, LearningRateSchedule):
    raise ValueError(
        "`l_softmax` / `sphereface` take the value of lambda, not a schedule; "
        "use the `LSoftmax` / `SphereFace` loss classes for a schedule."
    )
  cos, norms = split_head_output(labels.working_precision(y_pred))
  one_hot = labels.one_hot_like(y_true, cos)
  cos_y = labels.target_column(one_hot, cos)
  psi_y = _psi(cos_y, m)
  if not (isinstance(lambda_, float) and lambda_ == 0.0):
    lambda_ = ops.cast(lambda_, cos.dtype)
    psi_y = cos_y + (psi_y - cos_y) / (1.0 + lambda_)
  angular = labels.replace_target(one_hot, cos, psi_y)
  return labels.softmax_xent(one_hot, norms * angular)


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

  >>> head_output = np.array([[0.8, 0.3, -0.1, 2.0, 2.0, 2.0]], "float32")
  >>> round(float(sphereface([0], head_output, m=4)[0]), 3)
  2.725
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
    self.lambda_ = check_lambda(lambda_)
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
