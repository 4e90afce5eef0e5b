"""DepthwiseGradientConv2D against keras.layers.Conv2D and a numpy input gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import architectures
from tf_large_margin import convolution
from tf_large_margin.convolution import DepthwiseGradientConv2D

CASES = [
    # (input channels, kernel size, padding); one input channel takes the depthwise
    # path, more fall back to Conv2D (convolution.MAX_INPUT_CHANNELS).
    (1, 5, "same"),
    (1, 3, "valid"),
    (3, 4, "same"),  # even kernel: TensorFlow's SAME pads one more after
    (2, 3, "valid"),
    (1, (2, 3), "same"),
    (4, (3, 2), "valid"),
]


def numpy_input_gradient(dy, kernel, padding):
  """dL/dx of y[b, p, q, o] = sum_{u,v,i} x[b, p + u - ph, q + v - pw, i] w[u, v, i, o],
  scattered example by example, tap by tap."""
  kh, kw, cin, _ = kernel.shape
  batch, out_h, out_w, _ = dy.shape
  if padding == "same":
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    height, width = out_h, out_w
  else:
    ph = pw = 0
    height, width = out_h + kh - 1, out_w + kw - 1
  dx = np.zeros((batch, height, width, cin))
  for p in range(out_h):
    for q in range(out_w):
      for u in range(kh):
        for v in range(kw):
          r, c = p + u - ph, q + v - pw
          if 0 <= r < height and 0 <= c < width:
            dx[:, r, c, :] += dy[:, p, q, :] @ kernel[u, v].T
  return dx


def pair(cin, kernel_size, padding, rng, dtype="float64"):
  """A Conv2D and a DepthwiseGradientConv2D with the same weights, and an input."""
  x = tf.constant(rng.normal(size=(3, 7, 6, cin)), dtype)
  layers = [
      cls(5, kernel_size, padding=padding, activation="relu", dtype=dtype)
      for cls in (keras.layers.Conv2D, DepthwiseGradientConv2D)
  ]
  for layer in layers:
    layer.build(x.shape)
  layers[0].set_weights([w + 0.1 for w in layers[0].get_weights()])
  layers[1].set_weights(layers[0].get_weights())
  return x, layers


def gradients(layer, x, dy, *, function=False):
  """Output, input gradient, kernel gradient and the gradient of ||dL/dx||^2
  w.r.t. the kernel (second order), in eager mode or in a tf.function."""

  def run(x):
    with tf.GradientTape() as outer:
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
      dx, dk = tape.gradient(y, [x, layer.kernel], output_gradients=dy)
      squared = tf.reduce_sum(dx**2)
    return y, dx, dk, outer.gradient(squared, layer.kernel)

  return (tf.function(run) if function else run)(x)


@pytest.mark.parametrize("cin, kernel_size, padding", CASES)
@pytest.mark.parametrize("function", [False, True])
def test_values_and_gradients_equal_conv2d(cin, kernel_size, padding, function):
  rng = np.random.default_rng(cin)
  x, (reference, layer) = pair(cin, kernel_size, padding, rng)
  dy = tf.constant(rng.normal(size=reference(x).shape))
  expected = gradients(reference, x, dy, function=function)
  got = gradients(layer, x, dy, function=function)
  # The forward pass and the kernel gradient are TensorFlow's own ops.
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_array_equal(got[2], expected[2])
  # The input gradient (and what depends on it) in another summation order.
  np.testing.assert_allclose(got[1], expected[1], rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got[3], expected[3], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cin, kernel_size, padding", CASES)
def test_input_gradient_matches_a_numpy_scatter(cin, kernel_size, padding):
  rng = np.random.default_rng(10 + cin)
  kernel_size = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * 2
  kernel = rng.normal(size=(*kernel_size, cin, 5))
  out_shape = (2, 7, 6) if padding == "same" else (2, 8 - kernel_size[0], 7 - kernel_size[1])
  dy = rng.normal(size=(*out_shape, 5))
  np.testing.assert_allclose(
      convolution.depthwise_input_gradient(tf.constant(dy), tf.constant(kernel), padding),
      numpy_input_gradient(dy, kernel, padding),
      rtol=1e-12,
      atol=1e-12,
  )


def test_the_depthwise_path_runs_only_where_it_applies():
  """Strides, dilation and many channels fall back to Conv2D; so does XLA."""
  x = tf.zeros((1, 8, 8, 1))
  many = tf.zeros((1, 8, 8, convolution.MAX_INPUT_CHANNELS + 1))
  assert DepthwiseGradientConv2D(2, 3)._uses_depthwise_gradient(x)
  assert not DepthwiseGradientConv2D(2, 3)._uses_depthwise_gradient(many)
  assert not DepthwiseGradientConv2D(2, 3, strides=2)._uses_depthwise_gradient(x)
  assert not DepthwiseGradientConv2D(2, 3, dilation_rate=2)._uses_depthwise_gradient(x)
  under_xla = DepthwiseGradientConv2D(2, 3)
  under_xla.under_xla = True
  assert not under_xla._uses_depthwise_gradient(x)


def test_strided_layer_still_equals_conv2d():
  rng = np.random.default_rng(3)
  x = tf.constant(rng.normal(size=(2, 9, 9, 1)))
  reference = keras.layers.Conv2D(4, 3, strides=2, dtype="float64")
  layer = DepthwiseGradientConv2D(4, 3, strides=2, dtype="float64")
  reference.build(x.shape)
  layer.build(x.shape)
  layer.set_weights(reference.get_weights())
  dy = tf.constant(rng.normal(size=reference(x).shape))
  for got, expected in zip(gradients(layer, x, dy), gradients(reference, x, dy)):
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_model_compile_tells_the_layers_about_xla(jit_compile):
  keras.utils.set_random_seed(0)
  model = tlm.MarginModel.from_model(
      architectures.mnist_cnn(), margin=tlm.LayerMargin(gamma=1.0)
  )
  model.compile("sgd", jit_compile=jit_compile)
  flags = [
      layer.under_xla for layer in model.layers if isinstance(layer, DepthwiseGradientConv2D)
  ]
  assert flags == [jit_compile, jit_compile]


def test_round_trips_through_its_config():
  layer = DepthwiseGradientConv2D(3, 5, padding="same", use_bias=False)
  restored = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(layer)
  )
  assert type(restored) is DepthwiseGradientConv2D
  assert restored.get_config() == layer.get_config()
