"""Tests for the LambdaScheduler during fit (numbers checked against numpy)."""

import json

import keras
import numpy as np
import pytest

from tf_large_margin import callbacks
from tf_large_margin import multiplicative_margin_losses
from tf_large_margin import schedules
from tf_large_margin.layers import CosineHead
from output_margin_reference import (
    np_lambda_decay,
)


def _annealing_model(loss_cls, seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6,))
  features = keras.layers.Dense(8, activation="tanh")(inputs)
  model = keras.Model(
      inputs, CosineHead(3, name="head", **loss_cls.head_config)(features)
  )
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=16)
  return model, x, y


# Steep, so that consecutive steps have clearly different lambdas:
# 1000, 8.3, 2.3, 1.04, 0.59, 0.38.
STEEP = dict(base=1000.0, gamma=10.0, power=2.0, lambda_min=0.0)


@pytest.mark.parametrize(
    "loss_cls",
    [multiplicative_margin_losses.LSoftmax, multiplicative_margin_losses.SphereFace],
)
def test_lambda_schedule_advances_during_fit(loss_cls):
  """With learning rate 0 the weights stay fixed, so the loss logged for the
  one-step epoch i is the loss at lambda(i): the compiled train function reads
  the current step, not the value it was traced with."""
  model, x, y = _annealing_model(loss_cls)
  schedule = schedules.LambdaDecay(**STEEP)
  loss = loss_cls(m=2, lambda_=schedule)
  model.compile(keras.optimizers.SGD(0.0), loss=loss, jit_compile=False)
  epochs = 5
  history = model.fit(
      x,
      y,
      batch_size=16,
      epochs=epochs,
      verbose=0,
      shuffle=False,
      callbacks=[callbacks.LambdaScheduler()],
  )
  output = model(x)
  lambdas = [np_lambda_decay(i, **STEEP) for i in range(epochs)]
  expected = [float(loss_cls(m=2, lambda_=lam)(y, output)) for lam in lambdas]
  np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-5)
  assert expected[0] < 0.9 * expected[-1]  # lambda made a difference
  # the logs record the lambda of each epoch's (last) step
  np.testing.assert_allclose(history.history["lambda"], lambdas, rtol=1e-6)
  # after fit the loss is at the optimizer's step
  assert int(loss.step) == int(model.optimizer.iterations) == epochs
  np.testing.assert_allclose(
      float(loss.current_lambda()), np_lambda_decay(epochs, **STEEP), rtol=1e-6
  )

  # Without the callback the schedule stays at step 0 (lambda = base).
  model, x, y = _annealing_model(loss_cls)
  loss = loss_cls(m=2, lambda_=schedules.LambdaDecay(**STEEP))
  model.compile(keras.optimizers.SGD(0.0), loss=loss, jit_compile=False)
  history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
  assert int(loss.step) == 0
  np.testing.assert_allclose(history.history["loss"], [expected[0]] * 3, rtol=1e-5)


def test_lambda_scheduler_with_keras_schedule_and_several_steps_per_epoch():
  """Any Keras schedule works as lambda_; the step is the optimizer's step
  (not the epoch), and the losses in a dict of losses are found."""
  model, x, y = _annealing_model(multiplicative_margin_losses.SphereFace)
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [50.0, 0.0])
  loss = multiplicative_margin_losses.SphereFace(m=4, lambda_=schedule)
  model.compile(keras.optimizers.SGD(0.0), loss={"head": loss}, jit_compile=False)
  history = model.fit(
      x,
      y,
      batch_size=4,  # 4 steps per epoch
      epochs=2,
      verbose=0,
      shuffle=False,
      callbacks=[callbacks.LambdaScheduler()],
  )
  output = model(x)
  per_batch = [
      [
          float(
              multiplicative_margin_losses.SphereFace(m=4, lambda_=lam)(
                  y[i : i + 4], output[i : i + 4]
              )
          )
          for i in range(0, 16, 4)
      ]
      for lam in (50.0, 0.0)
  ]
  # PiecewiseConstantDecay: lambda 50 at steps <= 2, 0 from step 3 on
  epoch1 = np.mean(per_batch[0][:3] + per_batch[1][3:])
  epoch2 = np.mean(per_batch[1])
  np.testing.assert_allclose(history.history["loss"], [epoch1, epoch2], rtol=1e-5)
  assert int(loss.step) == 8
  assert history.history["lambda"] == [0.0, 0.0]  # at steps 3 and 7


def test_annealed_loss_serialization_and_resumed_schedule(tmp_path):
  """model.save / load_model keep the schedule; the loaded loss starts at step 0
  and LambdaScheduler resynchronises it with the restored optimizer step."""
  model, x, y = _annealing_model(multiplicative_margin_losses.LSoftmax)
  loss = multiplicative_margin_losses.LSoftmax(
      m=3, lambda_=schedules.LambdaDecay(**STEEP), name="ls"
  )
  model.compile(keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
  model.fit(
      x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callbacks.LambdaScheduler()]
  )
  assert int(loss.step) == 4
  path = tmp_path / "annealed.keras"
  model.save(path)
  restored = keras.saving.load_model(path)
  assert type(restored.loss) is multiplicative_margin_losses.LSoftmax
  assert restored.loss.get_config() == loss.get_config()
  assert isinstance(restored.loss.lambda_, schedules.LambdaDecay)
  assert restored.loss.lambda_.get_config() == STEEP
  assert int(restored.loss.step) == 0
  restored.fit(
      x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callbacks.LambdaScheduler()]
  )
  assert int(restored.optimizer.iterations) == 6 and int(restored.loss.step) == 6

  for lambda_ in (
      schedules.LambdaDecay(1.0, 2.0, 3.0, 0.5),
      keras.optimizers.schedules.ExponentialDecay(100.0, 10, 0.5),
      4.0,
  ):
    original = multiplicative_margin_losses.SphereFace(m=3, lambda_=lambda_)
    serialized = keras.saving.serialize_keras_object(original)
    json.dumps(serialized)  # JSON-compatible
    copy = keras.saving.deserialize_keras_object(serialized)
    assert (
        type(copy) is multiplicative_margin_losses.SphereFace
        and copy.get_config() == original.get_config()
    )
    for step in (0, 7):
      if copy.step is not None:
        copy.step.assign(step)
        original.step.assign(step)
      np.testing.assert_allclose(
          float(copy.current_lambda()), float(original.current_lambda())
      )


def test_lambda_scheduler_ignores_constant_lambdas():
  model, x, y = _annealing_model(multiplicative_margin_losses.LSoftmax)
  model.compile(
      "adam",
      loss=multiplicative_margin_losses.LSoftmax(m=2, lambda_=3.0),
      jit_compile=False,
  )
  history = model.fit(
      x, y, epochs=1, verbose=0, callbacks=[callbacks.LambdaScheduler()]
  )
  assert "lambda" not in history.history
  model, x, y = _annealing_model(multiplicative_margin_losses.LSoftmax)
  model.compile("adam", loss="mse", jit_compile=False)
  model.fit(
      x, np.zeros((16, 6)), epochs=1, verbose=0, callbacks=[callbacks.LambdaScheduler()]
  )


def test_lambda_scheduler_with_two_scheduled_losses_and_explicit_losses():
  inputs = keras.Input((6,))
  features = keras.layers.Dense(8, activation="tanh")(inputs)
  a = CosineHead(3, name="a", **multiplicative_margin_losses.LSoftmax.head_config)(
      features
  )
  b = CosineHead(3, name="b", **multiplicative_margin_losses.SphereFace.head_config)(
      features
  )
  model = keras.Model(inputs, {"a": a, "b": b})
  losses = {
      "a": multiplicative_margin_losses.LSoftmax(
          lambda_=schedules.LambdaDecay(**STEEP), name="ls"
      ),
      "b": multiplicative_margin_losses.SphereFace(
          lambda_=schedules.LambdaDecay(10.0, 1.0, 1.0, 0.0), name="sf"
      ),
  }
  model.compile(keras.optimizers.SGD(0.0), loss=losses, jit_compile=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=16)
  history = model.fit(
      x,
      {"a": y, "b": y},
      batch_size=8,
      epochs=2,
      verbose=0,
      callbacks=[callbacks.LambdaScheduler()],
  )
  np.testing.assert_allclose(
      history.history["ls_lambda"],
      [np_lambda_decay(s, **STEEP) for s in (1, 3)],
      rtol=1e-6,
  )
  np.testing.assert_allclose(history.history["sf_lambda"], [5.0, 2.5], rtol=1e-6)
  # only the losses given are updated
  losses["a"].step.assign(0)
  model.fit(
      x,
      {"a": y, "b": y},
      batch_size=8,
      epochs=1,
      verbose=0,
      callbacks=[callbacks.LambdaScheduler(losses=[losses["b"]])],
  )
  assert int(losses["a"].step) == 0 and int(losses["b"].step) == 6


@pytest.mark.parametrize(
    "loss_cls",
    [multiplicative_margin_losses.LSoftmax, multiplicative_margin_losses.SphereFace],
)
def test_annealing_trains_where_the_plain_loss_may_not(loss_cls):
  """A tiny model trains with the annealed loss (loss and accuracy improve)."""
  model, x, y = _annealing_model(loss_cls)
  loss = loss_cls(lambda_=schedules.LambdaDecay(100.0, 0.5, 1.0, 1.0))
  model.compile(keras.optimizers.Adam(0.02), loss=loss, jit_compile=False)
  before = float(loss_cls(lambda_=1.0)(y, model(x)))
  model.fit(
      x, y, batch_size=16, epochs=40, verbose=0, callbacks=[callbacks.LambdaScheduler()]
  )
  np.testing.assert_allclose(float(loss.current_lambda()), 100.0 / 21.0, rtol=1e-5)
  after = float(loss_cls(lambda_=1.0)(y, model(x)))
  assert np.isfinite(after) and after < 0.7 * before, (before, after)
