"""Training with the margin loss widens the input-space margin (real MNIST sample)."""

import keras
import numpy as np
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import architectures
from tf_large_margin import datasets
from tf_large_margin import margin_loss
from tf_large_margin import regularizers
from tf_large_margin.optimizers import RMSpropTF1


def flat(images):
  return images.reshape(len(images), -1).astype("float32") / 255.0


def median_input_margin(model, x, y):
  """Median first-order l2 distance to the boundary of correctly classified examples."""
  x = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = model(x)
  _, (distances,) = margin_loss.margin_distances(
      logits=logits,
      one_hot_labels=tf.one_hot(y, 10),
      layers_list=[x],
      dist_norm=2,
      tape=tape,
  )
  correct = logits.numpy().argmax(axis=1) == y
  return float(np.median(distances.numpy()[correct, 0])), float(correct.mean())


def train(margin, x, y):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((784,))
  logits = keras.layers.Dense(10)(keras.layers.Dense(128, activation="relu")(inputs))
  model = tlm.MarginModel(inputs, logits, margin=margin)  # margin at the input
  model.compile(
      keras.optimizers.Adam(1e-3),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  model.fit(x, y, batch_size=64, epochs=8, verbose=0)
  return model


def test_margin_training_widens_the_input_margin():
  x_train, y_train, x_test, y_test = datasets.load_dataset("mnist")  # embedded sample
  x_train, y_train = flat(x_train[:5000]), y_train[:5000]
  x_test, y_test = flat(x_test[:1000]), y_test[:1000]
  xent = train(None, x_train, y_train)
  large_margin = train(tlm.LayerMargin(gamma=4.0, dist_norm=2), x_train, y_train)
  xent_margin, xent_accuracy = median_input_margin(xent, x_test, y_test)
  margin_margin, margin_accuracy = median_input_margin(large_margin, x_test, y_test)
  # Measured (seeds 0-2): xent 3.7-5.3, margin 6.3-9.0; accuracy about 0.90 for both.
  assert margin_margin > 1.3 * xent_margin
  assert margin_accuracy > xent_accuracy - 0.02


def test_original_configuration_trains_at_learning_rate_0_01():
  """The original MNIST configuration learns with learning rate 0.01 (not 0.1).

  The Eq. 10 loss alone (no cross-entropy), linf at input+conv0+conv1 with "size"
  layer weights, gamma 1e4, alpha_factor 4, epsilon 1e-6, TF1 RMSProp with gradient
  clipping 5 and weight decay 5e-4, on the paper's CNN. At the original's learning
  rate 0.1 the run collapses to chance (see examples/REPRODUCTION.md).
  """
  x_train, y_train, x_test, y_test = datasets.load_dataset("mnist")  # embedded sample
  x_train, x_test = x_train.astype("float32") / 255.0, x_test.astype("float32") / 255.0
  keras.utils.set_random_seed(0)
  model = tlm.MarginModel.from_model(
      architectures.mnist_cnn(),
      margin_layers=["input", "conv0", "conv1"],
      layers_weights="size",
      margin=tlm.LayerMargin(gamma=1e4, alpha_factor=4.0, dist_norm="inf", epsilon=1e-6),
  )
  regularizers.apply_weight_decay(model, 5e-4)
  model.compile(
      RMSpropTF1(0.01, epsilon=1e-2, global_clipnorm=5.0),
      loss=None,
      metrics=["accuracy"],
  )
  model.fit(x_train, y_train, batch_size=64, epochs=3, steps_per_epoch=100, verbose=0)
  accuracy = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
  # Measured: 0.953 (training accuracy 0.93 in the last 100 steps); chance is 0.1.
  assert accuracy > 0.8
