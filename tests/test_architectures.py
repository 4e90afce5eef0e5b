"""The CIFAR pre-activation ResNet and the choice of evenly spaced margin layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import architectures
from tf_large_margin.convolution import DepthwiseGradientConv2D
from tf_large_margin.normalization import BatchNormalizationTF1


def test_cifar_resnet_shapes_and_block_names():
  model = architectures.cifar_resnet(depth=14, width=4)
  blocks = [
      layer
      for layer in model.layers
      if layer.name.startswith("block") and "_" not in layer.name
  ]
  assert [b.name for b in blocks] == [f"block{i}" for i in range(6)]
  # Stages of 2 blocks: 32x32x4, 16x16x8, 8x8x16.
  assert [tuple(b.output.shape[1:]) for b in blocks] == [(32, 32, 4)] * 2 + [
      (16, 16, 8)
  ] * 2 + [(8, 8, 16)] * 2
  logits = model(np.zeros((2, 32, 32, 3), "float32"))
  assert logits.shape == (2, 10)


def test_cifar_resnet_depth_counts_weight_layers():
  """depth = 6 n + 2 weight layers: the stem, 2 per block and the logits (the 1x1
  projection shortcuts are not counted, as in He et al.)."""
  for depth in (8, 20, 32):
    model = architectures.cifar_resnet(depth=depth)
    weighted = [
        l
        for l in model.layers
        if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))
        and not l.name.endswith("_shortcut")
    ]
    assert len(weighted) == depth


@pytest.mark.parametrize("depth", [7, 10, 2])
def test_cifar_resnet_bad_depth(depth):
  with pytest.raises(ValueError, match="6 n \\+ 2"):
    architectures.cifar_resnet(depth=depth)


def test_evenly_spaced():
  names = [f"b{i}" for i in range(27)]  # depth 56
  assert architectures.evenly_spaced(names, 4) == ["b6", "b13", "b19", "b26"]
  assert architectures.evenly_spaced(names, 1) == ["b26"]
  assert architectures.evenly_spaced(names, 27) == names
  assert architectures.evenly_spaced(names, 0) == []
  with pytest.raises(ValueError, match="Cannot pick 28 of 27"):
    architectures.evenly_spaced(names, 28)


def test_mnist_cnn_is_the_original_network():
  """conv -> max-pool -> ReLU -> BN per block; the endpoints are the BN outputs."""
  model = architectures.mnist_cnn()
  kinds = [(type(l).__name__, l.name) for l in model.layers]
  assert kinds == [
      ("InputLayer", "image"),
      ("DepthwiseGradientConv2D", "conv0_conv"),
      ("MaxPooling2D", "conv0_pool"),
      ("ReLU", "conv0_relu"),
      ("BatchNormalizationTF1", "conv0"),
      ("DepthwiseGradientConv2D", "conv1_conv"),
      ("MaxPooling2D", "conv1_pool"),
      ("ReLU", "conv1_relu"),
      ("BatchNormalizationTF1", "conv1"),
      ("Flatten", "flatten"),
      ("Dense", "fc0"),
      ("Dense", "logits"),
  ]
  for i, filters in enumerate((32, 64)):
    conv = model.get_layer(f"conv{i}_conv")
    assert (conv.filters, conv.kernel_size, conv.padding, conv.use_bias) == (
        filters,
        (5, 5),
        "same",
        False,
    )
    assert conv.activation is keras.activations.linear
    bn = model.get_layer(f"conv{i}")
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
  assert tuple(model.get_layer("conv0").output.shape[1:]) == (14, 14, 32)
  assert tuple(model.get_layer("conv1").output.shape[1:]) == (7, 7, 64)
  assert model.get_layer("fc0").activation is keras.activations.relu
  assert model.count_params() == 800 + 4 * 32 + 51200 + 4 * 64 + 3136 * 512 + 512 + 5130


def _original_layer_order(num_classes=10):
  """The original `MNISTNetwork`'s layer order: conv(ReLU) -> ReLU -> max-pool -> BN
  (with `mnist_cnn`'s convolution layer, so that only the order differs)."""
  inputs = keras.Input((28, 28, 1))
  h = inputs
  for filters in (32, 64):
    h = DepthwiseGradientConv2D(
        filters, 5, padding="same", use_bias=False, activation="relu"
    )(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = BatchNormalizationTF1(momentum=0.9, epsilon=1e-5)(h)
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dense(512, activation="relu")(h)
  return keras.Model(inputs, keras.layers.Dense(num_classes)(h))


def test_mnist_cnn_equals_the_originals_layer_order_bit_for_bit():
  """One ReLU after the max-pool instead of the original's two before it: the same
  outputs, weight and input gradients (training mode, batch statistics), to the
  last bit."""
  model = architectures.mnist_cnn()
  original = _original_layer_order()
  original.set_weights(model.get_weights())
  x = tf.constant(np.random.default_rng(0).normal(size=(16, 28, 28, 1)), "float32")
  # Ties inside a pooling window, positive and zero: routed alike.
  x = tf.concat([x[:8], tf.round(x[8:])], axis=0)

  def outputs_and_gradients(network):
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits = network(x, training=True)
      loss = tf.reduce_sum(tf.sin(logits))
    return [logits, *tape.gradient(loss, [x, *network.trainable_weights])]

  for got, expected in zip(outputs_and_gradients(model), outputs_and_gradients(original)):
    np.testing.assert_array_equal(got, expected)
