"""RMSpropTF1 against hand-written TF1 RMSProp updates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin.optimizers import RMSpropTF1

GRADIENTS = [
    np.array([0.5, -2.0, 0.0], "float32"),
    np.array([-1.0, 3.0, 0.25], "float32"),
    np.array([0.1, 0.1, -4.0], "float32"),
]
START = np.array([1.0, -1.0, 2.0], "float32")


def tf1_rmsprop(lr, rho, momentum, epsilon, ms_start=1.0):
  """The TF1 ApplyRMSProp kernel, written out."""
  var, ms, mom = START.astype("float64"), np.full(3, ms_start), np.zeros(3)
  for g in GRADIENTS:
    ms = rho * ms + (1 - rho) * g**2
    mom = momentum * mom + lr * g / np.sqrt(ms + epsilon)
    var = var - mom
  return var


def run(optimizer):
  variable = keras.Variable(START)
  for g in GRADIENTS:
    optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
  return keras.ops.convert_to_numpy(variable)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_tf1_kernel(momentum):
  got = run(RMSpropTF1(0.1, rho=0.9, momentum=momentum, epsilon=1e-2))
  np.testing.assert_allclose(got, tf1_rmsprop(0.1, 0.9, momentum, 1e-2), rtol=1e-5)


def test_differs_from_keras_rmsprop():
  """Keras' accumulators start at 0: the hand computation tells the two apart."""
  keras_result = run(keras.optimizers.RMSprop(0.1, rho=0.9, epsilon=1e-2))
  np.testing.assert_allclose(
      keras_result, tf1_rmsprop(0.1, 0.9, 0.0, 1e-2, 0.0), rtol=1e-5
  )
  assert np.abs(keras_result - tf1_rmsprop(0.1, 0.9, 0.0, 1e-2)).max() > 0.1


def test_defaults_are_tf1s():
  optimizer = RMSpropTF1()
  assert (optimizer.rho, optimizer.momentum, optimizer.epsilon) == (0.9, 0.0, 1e-10)


def test_config_round_trip():
  optimizer = RMSpropTF1(0.05, momentum=0.5, epsilon=1e-3, global_clipnorm=5.0)
  restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
  assert isinstance(restored, RMSpropTF1)
  np.testing.assert_allclose(run(restored), run(optimizer), rtol=1e-6)


def test_fit_starts_the_accumulators_at_one():
  """`fit` builds the optimizer symbolically: the rms slots must still start at 1.

  One fit step of a linear model against the TF1 kernel applied by hand to the
  gradient of the same batch (an optimizer whose slots start at 0 takes a step of
  about 3 lr sign(g) instead, and leaves 0.1 g^2 in the slot).
  """
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 3)).astype("float32")
  y = rng.normal(size=(8, 2)).astype("float32")
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  start = [w.numpy().astype("float64") for w in model.trainable_weights]
  with tf.GradientTape() as tape:
    loss = keras.losses.MeanSquaredError()(y, model(x))
  grads = [g.numpy().astype("float64") for g in tape.gradient(loss, model.trainable_weights)]
  model.compile(RMSpropTF1(0.1, rho=0.9, epsilon=1e-2), loss="mse")
  model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  slots = [v for v in model.optimizer.variables if "velocity" in v.path]
  assert len(slots) == 2
  for w0, g, w, slot in zip(start, grads, model.trainable_weights, slots):
    ms = 0.9 * 1.0 + 0.1 * g**2
    np.testing.assert_allclose(slot.numpy(), ms, rtol=1e-6)
    np.testing.assert_allclose(
        w.numpy(), w0 - 0.1 * g / np.sqrt(ms + 1e-2), rtol=1e-5, atol=1e-7
    )
