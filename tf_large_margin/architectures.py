"""Networks of the papers' experiments, as Keras functional models."""

import keras

from tf_large_margin.convolution import DepthwiseGradientConv2D
from tf_large_margin.normalization import BatchNormalizationTF1


def mnist_cnn(num_classes=10, input_shape=(28, 28, 1), name="mnist_cnn"):
  """The MNIST CNN of Elsayed et al. 2018: the original's network, same values and gradients.

  Per block i = 0, 1 (32 then 64 filters), as the original `MNISTNetwork` with
  batch norm on:

      conv{i}_conv  5x5 convolution, same padding, no bias (`DepthwiseGradientConv2D`:
                    Conv2D with a faster input gradient for conv0's 1 channel)
      conv{i}_pool  2x2 max-pooling, stride 2
      conv{i}_relu  ReLU
      conv{i}       batch normalisation (momentum 0.9, epsilon 1e-5), moving
                    variance updated as TF1 (`BatchNormalizationTF1`)

  then flatten, "fc0" (512 units, ReLU) and "logits" (``num_classes`` units). The
  original applies the ReLU twice before the max-pool (as the convolution's
  activation, then again); relu(relu(z)) = relu(z) and max-pooling commutes with
  the ReLU, and the backward passes route each cotangent to the same position
  (a window's maximum if it is positive, nowhere otherwise), so one ReLU after
  the pool gives the same values and gradients bit for bit (test) with three of
  the four passes over the largest activations gone (forward and backward). The
  block outputs "conv0" [14, 14, 32] and "conv1" [7, 7, 64] are the batch-norm
  outputs: the original's margin endpoints ``conv_layer0`` / ``conv_layer1``, which
  with "input" are the margin layers of its MNIST configuration. Kernels are
  Glorot-uniform, biases 0, as the original's defaults.
  """
  inputs = keras.Input(input_shape, name="image")
  h = inputs
  for i, filters in enumerate((32, 64)):
    h = DepthwiseGradientConv2D(
        filters,
        5,
        padding="same",
        use_bias=False,
        name=f"conv{i}_conv",
    )(h)
    h = keras.layers.MaxPooling2D(2, name=f"conv{i}_pool")(h)
    h = keras.layers.ReLU(name=f"conv{i}_relu")(h)
    h = BatchNormalizationTF1(momentum=0.9, epsilon=1e-5, name=f"conv{i}")(h)
  h = keras.layers.Flatten(name="flatten")(h)
  h = keras.layers.Dense(512, activation="relu", name="fc0")(h)
  logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(h)
  return keras.Model(inputs, logits, name=name)


def _preact_block(h, filters, stride, name):
  """Pre-activation residual block (BN-ReLU-conv3x3 twice); output named ``name``."""
  shortcut = h
  h = keras.layers.BatchNormalization(name=f"{name}_bn0")(h)
  h = keras.layers.ReLU(name=f"{name}_relu0")(h)
  if stride != 1 or shortcut.shape[-1] != filters:
    # Projection of the pre-activated input, as in He et al. 2016 (v2).
    shortcut = keras.layers.Conv2D(
        filters, 1, strides=stride, use_bias=False, name=f"{name}_shortcut"
    )(h)
  h = keras.layers.Conv2D(
      filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv0"
  )(h)
  h = keras.layers.BatchNormalization(name=f"{name}_bn1")(h)
  h = keras.layers.ReLU(name=f"{name}_relu1")(h)
  h = keras.layers.Conv2D(
      filters, 3, padding="same", use_bias=False, name=f"{name}_conv1"
  )(h)
  return keras.layers.Add(name=name)([shortcut, h])


def cifar_resnet(
    depth=32, num_classes=10, input_shape=(32, 32, 3), width=16, name=None
):
  """Pre-activation ResNet for CIFAR (He et al. 2016, "Identity Mappings").

  ``depth = 6 n + 2``: a 3x3 convolution, three stages of n basic blocks with
  ``width``, 2 ``width`` and 4 ``width`` filters (stride 2 at the start of stages 2
  and 3), then batch normalisation, ReLU, global average pooling and the logits.
  Block outputs are named "block0", "block1", ... (3 n of them, in order): the
  hidden layers a margin can be enforced at, besides "input".
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f"depth must be 6 n + 2 with n >= 1 (8, 14, 20, 32, 56, ...); got {depth}."
    )
  blocks_per_stage = (depth - 2) // 6
  inputs = keras.Input(input_shape, name="image")
  h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem")(inputs)
  for stage in range(3):
    for block in range(blocks_per_stage):
      stride = 2 if stage > 0 and block == 0 else 1
      h = _preact_block(
          h, width * 2**stage, stride, f"block{stage * blocks_per_stage + block}"
      )
  h = keras.layers.BatchNormalization(name="final_bn")(h)
  h = keras.layers.ReLU(name="final_relu")(h)
  h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
  logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(h)
  return keras.Model(inputs, logits, name=name or f"preact_resnet{depth}")


def evenly_spaced(names, count):
  """``count`` names spread evenly over ``names``, the last one included.

  >>> evenly_spaced(["b0", "b1", "b2", "b3", "b4", "b5"], 3)
  ['b1', 'b3', 'b5']
  """
  if not 0 <= count <= len(names):
    raise ValueError(f"Cannot pick {count} of {len(names)} layers.")
  return [names[round((i + 1) * len(names) / count) - 1] for i in range(count)]
