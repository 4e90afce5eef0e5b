"""BatchNormalizationTF1 against the TF1 update written out in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin.normalization import BatchNormalizationTF1


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
