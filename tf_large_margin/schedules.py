"""Schedules of the training step: `LambdaDecay`, the L-Softmax / SphereFace lambda.

    lambda(step) = max(lambda_min, base (1 + gamma step)^(-power))

A `keras.optimizers.schedules.LearningRateSchedule` (serialisable); the
`tf_large_margin.callbacks.LambdaScheduler` callback advances it during `fit`.
"""

import numbers

import keras
from keras import ops
from keras.optimizers.schedules import LearningRateSchedule

from tf_large_margin.argument_checks import check_real


def check_lambda(lambda_):
  """Validates `lambda_`: a number `>= 0` or a `LearningRateSchedule`."""
  if isinstance(lambda_, LearningRateSchedule):
    return lambda_
  if isinstance(lambda_, bool) or not isinstance(lambda_, numbers.Real):
    raise ValueError(
        "`lambda_` must be a non-negative number or a schedule of the training "
        "step (a keras.optimizers.schedules.LearningRateSchedule such as "
        f"tf_large_margin.LambdaDecay), got lambda_={lambda_!r}."
    )
  return check_real("lambda_", lambda_)


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
  >>> [round(float(schedule(step)), 1) for step in (0, 100, 10_000)]
  [1000.0, 76.9, 5.0]
  """

  def __init__(self, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
    self.base = check_real("base", base)
    self.gamma = check_real("gamma", gamma)
    self.power = check_real("power", power)
    self.lambda_min = check_real("lambda_min", lambda_min)
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
