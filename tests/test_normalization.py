"""BatchNormalizationTF1 against the TF1 update written out in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin.normalization import BatchNormalizationTF1
from tf_large_margin.normalization import normalization_gradient


def test_training_step_normalises_with_biased_and_tracks_unbiased_variance():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 3, 3, 2)).astype("float32")
  layer = BatchNormalizationTF1(momentum=0.9, epsilon=1e-5)
  out = np.asarray(layer(x, training=True), np.float64)
  x64 = x.astype(np.float64)
  n = 4 * 3 * 3
  mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
  np.testing.assert_allclose(out, (x64 - mean) / np.sqrt(var + 1e-5), atol=1e-5)
  np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(
      layer.moving_variance.numpy(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-6
  )
  # Keras' own layer tracks the biased variance: the two differ here.
  keras_layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
  keras_layer(x, training=True)
  assert not np.allclose(
      keras_layer.moving_variance.numpy(), layer.moving_variance.numpy(), rtol=1e-4
  )


def test_inference_uses_moving_statistics_and_round_trips():
  layer = BatchNormalizationTF1(momentum=0.9, epsilon=1e-5)
  x = np.ones((2, 5), "float32")
  layer(x, training=True)
  restored = BatchNormalizationTF1.from_config(layer.get_config())
  restored.build(x.shape)
  restored.set_weights(layer.get_weights())
  np.testing.assert_allclose(
      restored(x, training=False), layer(x, training=False), rtol=1e-6
  )
  expected = (1.0 - 0.1) / np.sqrt(0.9 + 1e-5)
  np.testing.assert_allclose(layer(x, training=False), np.full((2, 5), expected), rtol=1e-5)


@pytest.mark.parametrize("batch", [3, 5])
def test_unknown_batch_size_in_a_function(batch):
  """The count n is a tensor when the batch size is unknown while tracing."""
  inputs = keras.Input((2,))
  model = keras.Model(inputs, BatchNormalizationTF1(momentum=0.0)(inputs))
  x = np.arange(batch * 2, dtype="float32").reshape(batch, 2)
  step = tf.function(
      lambda x: model(x, training=True),
      input_signature=[tf.TensorSpec([None, 2], tf.float32)],
  )
  step(x)
  np.testing.assert_allclose(
      model.layers[-1].moving_variance.numpy(), x.var(axis=0) * batch / (batch - 1), rtol=1e-5
  )


def _batch_norm_by_autodiff(x, gamma, beta, epsilon):
  """y = gamma (x - mean) / sqrt(var + epsilon) + beta with every statistic
  differentiated (Keras' moments stop the gradient of the mean inside the
  variance, which drops a second-order term)."""
  axes = list(range(len(x.shape) - 1))
  mean = tf.reduce_mean(x, axis=axes)
  variance = tf.reduce_mean((x - mean) ** 2, axis=axes)
  return gamma * (x - mean) / tf.sqrt(variance + epsilon) + beta


def _first_and_second_order(forward, x, gamma, dy):
  """dL/dx, dL/dgamma for L = <y, dy>, and the gradient of S = ||dL/dx||^2 +
  <dL/dx, x> w.r.t. x and gamma (a margin without the stop-gradient
  approximation differentiates a gradient norm in the same way)."""
  with tf.GradientTape(persistent=True) as outer:
    outer.watch([x, gamma])
    with tf.GradientTape() as tape:
      tape.watch([x, gamma])
      y = forward(x, gamma)
    dx, dgamma = tape.gradient(y, [x, gamma], output_gradients=dy)
    second = tf.reduce_sum(dx**2) + tf.reduce_sum(dx * x)
  return [dx, dgamma, *outer.gradient(second, [x, gamma])]


@pytest.mark.parametrize("shape", [(6, 4, 3, 5), (9, 3), (4, 7, 3)])
@pytest.mark.parametrize(
    # float64: `normalization_gradient`; float32: TensorFlow's fused kernel (on
    # CPU), against the same values differentiated in float64.
    "dtype, tolerance", [("float64", 1e-10), ("float32", 2e-5)]
)
def test_training_gradients_to_second_order(shape, dtype, tolerance):
  rng = np.random.default_rng(len(shape))
  as_dtype = lambda values: tf.constant(values.astype(dtype))
  x = as_dtype(rng.normal(2.0, 3.0, size=shape))
  dy = as_dtype(rng.normal(size=shape))
  beta = as_dtype(rng.normal(size=shape[-1]))
  layer = BatchNormalizationTF1(momentum=0.9, epsilon=1e-5, dtype=dtype)
  layer.build(shape)
  layer.beta.assign(beta)

  gamma = as_dtype(rng.normal(size=shape[-1]))
  layer.gamma.assign(gamma)
  with tf.GradientTape(persistent=True) as outer:
    outer.watch(x)
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
    dx, dgamma, dbeta = tape.gradient(
        y, [x, layer.gamma, layer.beta], output_gradients=dy
    )
    second = tf.reduce_sum(dx**2) + tf.reduce_sum(dx * x)
  got = [dx, dgamma, *outer.gradient(second, [x, layer.gamma]), dbeta]
  x, gamma, dy, beta = (tf.cast(t, "float64") for t in (x, gamma, dy, beta))
  expected = _first_and_second_order(
      lambda x, g: _batch_norm_by_autodiff(x, g, beta, 1e-5), x, gamma, dy
  )
  expected.append(tf.reduce_sum(dy, axis=list(range(len(shape) - 1))))
  for g, e in zip(got, expected):
    assert g.dtype == dtype
    scale = np.abs(e).max()
    np.testing.assert_allclose(g, e, rtol=tolerance, atol=tolerance * scale)


def test_written_out_gradient_against_autodiff_statistics():
  rng = np.random.default_rng(7)
  x = tf.constant(rng.normal(1.0, 2.0, size=(5, 4, 4, 3)))
  dy = tf.constant(rng.normal(size=x.shape))
  gamma = tf.constant(rng.normal(size=3))
  beta = tf.constant(rng.normal(size=3))
  with tf.GradientTape() as tape:
    tape.watch([x, gamma, beta])
    y = _batch_norm_by_autodiff(x, gamma, beta, 1e-3)
  expected = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
  mean = tf.reduce_mean(x, axis=[0, 1, 2])
  variance = tf.math.reduce_variance(x, axis=[0, 1, 2])
  got = normalization_gradient(dy, x, mean, variance, gamma, 1e-3)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_synchronized_is_keras_own():
  """synchronized=True: Keras' layer throughout (statistics, gradients and the
  moving-variance update across replicas), not the one-replica TF1 path."""
  rng = np.random.default_rng(3)
  x = tf.constant(rng.normal(1.0, 2.0, size=(6, 3, 3, 4)).astype("float32"))
  dy = tf.constant(rng.normal(size=x.shape).astype("float32"))
  results = []
  for layer in (
      BatchNormalizationTF1(momentum=0.5, synchronized=True),
      keras.layers.BatchNormalization(momentum=0.5, synchronized=True),
  ):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
    results.append([y, tape.gradient(y, x, output_gradients=dy), layer.moving_variance])
  for got, expected in zip(*results):
    np.testing.assert_array_equal(got, expected)
