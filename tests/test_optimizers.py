"""RMSpropTF1 against hand-written TF1 RMSProp updates."""

import keras
import numpy as np
import pytest

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
