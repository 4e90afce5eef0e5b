"""Tests for the LambdaDecay and lambda validation (numbers checked against numpy)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import multiplicative_margin_losses
from tf_large_margin import schedules
from output_margin_reference import (
    np_lambda_decay,
)


def test_lambda_decay_values():
  steps = [0, 1, 2, 10, 100, 1000, 10_000, 100_000]
  for params in [
      (1000.0, 0.12, 1.0, 5.0),  # SphereFace
      (1000.0, 0.12, 1.0, 0.0),
      (100.0, 0.01, 2.0, 0.5),
      (7.0, 0.0, 1.0, 0.0),  # gamma = 0: constant
      (50.0, 1.0, 0.0, 1.0),  # power = 0: constant
  ]:
    schedule = schedules.LambdaDecay(*params)
    got = [float(schedule(tf.constant(s, tf.int64))) for s in steps]
    expected = [np_lambda_decay(s, *params) for s in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
  default = schedules.LambdaDecay()
  assert (default.base, default.gamma, default.power, default.lambda_min) == (
      1000.0,
      0.12,
      1.0,
      5.0,
  )
  assert float(default(0)) == 1000.0 and float(default(10**6)) == 5.0


@pytest.mark.parametrize(
    "factory, match",
    [
        (
            lambda: multiplicative_margin_losses.LSoftmax(lambda_=-1.0),
            "lambda_.*non-negative",
        ),
        (
            lambda: multiplicative_margin_losses.SphereFace(lambda_=float("inf")),
            "lambda_.*finite",
        ),
        (
            lambda: multiplicative_margin_losses.SphereFace(lambda_=float("nan")),
            "lambda_.*finite",
        ),
        (
            lambda: multiplicative_margin_losses.LSoftmax(lambda_="1000"),
            "lambda_.*schedule",
        ),
        (lambda: multiplicative_margin_losses.LSoftmax(lambda_=True), "lambda_"),
        (
            lambda: multiplicative_margin_losses.LSoftmax(lambda_=lambda step: 1.0),
            "lambda_.*schedule",
        ),
        (
            lambda: multiplicative_margin_losses.l_softmax(
                [0], [[0.1, 0.2, 1.0, 1.0]], lambda_=-2.0
            ),
            "lambda_",
        ),
        (
            lambda: multiplicative_margin_losses.sphereface(
                [0], [[0.1, 0.2, 1.0, 1.0]], lambda_=schedules.LambdaDecay()
            ),
            "not a schedule",
        ),
        (lambda: schedules.LambdaDecay(base=-1.0), "base.*non-negative"),
        (lambda: schedules.LambdaDecay(gamma=-0.1), "gamma.*non-negative"),
        (lambda: schedules.LambdaDecay(power=-1.0), "power.*non-negative"),
        (lambda: schedules.LambdaDecay(lambda_min=-5.0), "lambda_min.*non-negative"),
        (lambda: schedules.LambdaDecay(gamma=float("nan")), "gamma.*finite"),
        (lambda: schedules.LambdaDecay(base="1000"), "base"),
        (lambda: schedules.LambdaDecay(base=10.0, lambda_min=20.0), "lambda_min.*base"),
    ],
)
def test_bad_lambda_raises(factory, match):
  with pytest.raises(ValueError, match=match):
    factory()
