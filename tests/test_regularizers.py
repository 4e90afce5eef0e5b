"""Weight decay over all trainable variables, as the original's loss term."""

import keras
import numpy as np
import pytest

import tf_large_margin as tlm
from tf_large_margin.regularizers import WeightDecay
from tf_large_margin.regularizers import apply_weight_decay

RATE = 0.01


def small_model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  h = keras.layers.Dense(5, name="fc")(inputs)
  h = keras.layers.BatchNormalization(name="bn")(h)
  logits = keras.layers.Dense(3, name="logits")(h)
  return keras.Model(inputs, logits)


def decay_by_hand(model):
  return RATE * sum(
      0.5 * np.sum(np.square(v.numpy())) for v in model.trainable_variables
  )


def test_regularizer_value():
  x = np.array([[1.0, -2.0], [3.0, 0.5]], "float32")
  np.testing.assert_allclose(
      float(WeightDecay(0.1)(x)), 0.1 * (1 + 4 + 9 + 0.25) / 2, rtol=1e-6
  )


def test_negative_rate():
  with pytest.raises(ValueError, match="must be >= 0"):
    WeightDecay(-1.0)


def test_model_losses_cover_all_trainable_variables():
  model = apply_weight_decay(small_model(), RATE)
  # kernels and biases of both Dense layers, gamma and beta of batch norm.
  assert len(model.losses) == len(model.trainable_variables) == 6
  np.testing.assert_allclose(
      sum(float(l) for l in model.losses), decay_by_hand(model), rtol=1e-6
  )


def test_sgd_step_on_decay_alone_shrinks_every_trainable_variable():
  """Gradient of rate * v^2 / 2 is rate * v: one SGD step multiplies v by 1 - lr rate."""
  model = apply_weight_decay(small_model(), RATE)
  model.compile(
      keras.optimizers.SGD(0.5), loss=lambda y, logits: 0.0 * keras.ops.sum(logits)
  )
  before = {v.path: v.numpy() for v in model.trainable_variables}
  frozen = {v.path: v.numpy() for v in model.non_trainable_variables}
  model.train_on_batch(np.ones((2, 4), "float32"), np.zeros((2,)))
  for v in model.trainable_variables:
    np.testing.assert_allclose(
        v.numpy(), before[v.path] * (1 - 0.5 * RATE), rtol=1e-6, err_msg=v.path
    )
  gamma = model.get_layer("bn").gamma.numpy()
  np.testing.assert_allclose(gamma, 1 - 0.5 * RATE, rtol=1e-6)
  assert any(np.any(v.numpy() != frozen[v.path]) for v in model.non_trainable_variables)


def test_margin_model_step_adds_the_decay():
  x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
  y = np.arange(8) % 3
  losses = []
  for rate in (0.0, RATE):
    model = tlm.MarginModel.from_model(
        small_model(), margin=tlm.LayerMargin(gamma=1.0), margin_layers=["input", "fc"]
    )
    if rate:
      apply_weight_decay(model, rate)
    model.compile(keras.optimizers.SGD(0.0), loss=None)
    losses.append(model.train_on_batch(x, y, return_dict=True)["loss"])
  np.testing.assert_allclose(losses[1] - losses[0], decay_by_hand(model), rtol=1e-4)


def test_refuses_a_second_regularizer():
  inputs = keras.Input((4,))
  logits = keras.layers.Dense(3, kernel_regularizer="l2", name="fc")(inputs)
  with pytest.raises(ValueError, match="fc/kernel.*already have a regularizer"):
    apply_weight_decay(keras.Model(inputs, logits), RATE)


def test_unbuilt_model():
  with pytest.raises(ValueError, match="no trainable variables"):
    apply_weight_decay(keras.Sequential([keras.layers.Dense(2)]), RATE)
