"""Networks of the papers' experiments, as Keras functional models."""

import keras


def mnist_cnn(num_classes=10, input_shape=(28, 28, 1), name="mnist_cnn"):
  """The MNIST CNN of Elsayed et al. 2018 (the original code's model).

  Two blocks of 5x5 convolution (32 then 64 filters, same padding, no bias), batch
  normalisation, ReLU and 2x2 max-pooling, then a 512-unit ReLU layer and the
  logits. The blocks' outputs are the layers named "conv0" and "conv1" (the margin
  layers of the original MNIST configuration, with "input").
  """
  inputs = keras.Input(input_shape, name="image")
  h = inputs
  for i, filters in enumerate((32, 64)):
    h = keras.layers.Conv2D(filters, 5, padding="same", use_bias=False)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D(2, name=f"conv{i}")(h)
  h = keras.layers.Dense(512, activation="relu", name="fc0")(keras.layers.Flatten()(h))
  logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(h)
  return keras.Model(inputs, logits, name=name)
