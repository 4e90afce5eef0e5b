"""`MarginModel`'s gradients at layers, distances and training steps under one
Keras backend, from the same weights and batches, saved for comparison.

Run by tests/test_margin_model_backends.py once per backend, in a fresh process:

  KERAS_BACKEND=tensorflow|jax python tests/margin_model_values.py OUT.npz

Two models, with fixed numpy weights:

  skip   float64 dense layers (sigmoid: XLA's float64 tanh and softplus are
         ~1e-7 off TensorFlow's) with a skip connection across the margin layer "a"
         and Keras' BatchNormalization in training mode (use_approximation=True:
         TF's moments stop the mean's gradient in the variance, JAX's do not);
         margin at ["input", "b", "a", "out"] (not in graph order; "out" is
         the logits layer), top_k=2.
  paper  the paper's MNIST network (`architectures.mnist_cnn`: DepthwiseGradientConv2D,
         BatchNormalizationTF1, float32 logits) on 8x8 inputs, margin at
         ["input", "conv0", "conv1"], use_approximation=False, dist_norm=inf.

For each: the gradients of <logits, c> at the margin layers (TensorFlow: the
model's tape; JAX: its `jax.vjp` pullback), `layer_distances`, two `fit` steps
(``jit_compile=True`` under JAX; not under TensorFlow, whose XLA has no second
derivative of max-pooling, MaxPoolGradGrad, which use_approximation=False needs),
the weights after them (batch-norm moving statistics
included) and `evaluate`. Under JAX (run with XLA_FLAGS=
--xla_force_host_platform_device_count=2), "skip_parallel" and "paper_parallel"
repeat the models' steps under `keras.distribution.DataParallel` on the two CPU devices.
TensorFlow is made unimportable under JAX: the model must not need it. Under JAX
the script also records the errors of the cases not supported there yet.
"""

import sys

import numpy as np

from backend_subprocess import BACKEND  # first: before Keras

# pylint: disable=wrong-import-position
import keras

import tf_large_margin as tlm


def skip_model():
  inputs = keras.Input((6,))
  a = keras.layers.Dense(8, activation="sigmoid", name="a")(inputs)
  h = keras.layers.Dense(8, name="b_dense")(a)
  h = keras.layers.BatchNormalization(momentum=0.8, name="b")(h)
  h = keras.layers.Activation("sigmoid")(h)
  h = keras.layers.Add()([a, h])
  logits = keras.layers.Dense(4, name="out")(h)
  margin = tlm.LayerMargin(gamma=2.0, top_k=2, epsilon=1e-6)
  model = tlm.MarginModel(
      inputs, logits, margin=margin, margin_layers=["input", "b", "a", "out"]
  )
  return model, (16, 6), 4


def paper_model():
  net = tlm.architectures.mnist_cnn(num_classes=5, input_shape=(8, 8, 1))
  margin = tlm.LayerMargin(
      gamma=5.0, top_k=2, dist_norm=np.inf, use_approximation=False, epsilon=1e-6
  )
  model = tlm.MarginModel.from_model(
      net, margin_layers=["input", "conv0", "conv1"], margin=margin
  )
  return model, (8, 8, 8, 1), 5


def set_weights(model):
  rng = np.random.default_rng(0)
  for weight in model.weights:
    value = rng.normal(scale=0.5, size=weight.shape)
    if len(weight.shape) > 1:  # a kernel: 1 / sqrt(fan-in), as Glorot's scale
      value = value * 2.0 / np.sqrt(np.prod(weight.shape[:-1]))
    if "variance" in weight.path:
      value = np.abs(value) + 0.5
    weight.assign(value.astype(weight.dtype))


def data(shape, classes):
  rng = np.random.default_rng(1)
  return rng.normal(size=shape), rng.integers(0, classes, size=shape[0])


def layer_gradients(model, x, classes):
  """The gradients of <logits, c> at the margin layers, c fixed random."""
  y_pred, activations = model.forward_pass(x, training=False)
  del y_pred
  cotangent = np.random.default_rng(2).normal(size=(x.shape[0], classes))
  cotangent = keras.ops.convert_to_tensor(cotangent, activations.logits.dtype)
  if BACKEND == "tensorflow":
    return activations.tape.gradient(
        activations.logits, activations.layers, output_gradients=cotangent
    )
  return activations.vjp(cotangent)


def flat(tensors):
  return np.concatenate([np.ravel(keras.ops.convert_to_numpy(t)) for t in tensors])


def run(name, build, results, train_only=False):
  model, shape, classes = build()
  set_weights(model)
  x, y = data(shape, classes)
  if not train_only:
    results[f"{name}/initial_weights"] = flat(model.weights)
    results[f"{name}/gradients"] = flat(layer_gradients(model, x, classes))
    results[f"{name}/distances"] = flat(model.layer_distances(x, y))
  model.compile(
      keras.optimizers.SGD(0.05),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      jit_compile=BACKEND == "jax",
  )
  history = model.fit(x, y, batch_size=shape[0], epochs=2, shuffle=False, verbose=0)
  results[f"{name}/history"] = np.array(
      [history.history["loss"], history.history["margin"]]
  )
  results[f"{name}/weights"] = flat(model.weights)
  evaluation = model.evaluate(x, y, batch_size=shape[0], verbose=0, return_dict=True)
  results[f"{name}/evaluate"] = np.array([evaluation["loss"], evaluation["margin"]])


def error_message(fn):
  try:
    fn()
  except ValueError as error:
    return str(error)
  return ""


def unsupported_errors():
  """The errors of what the margin under JAX does not support yet."""

  class Subclassed(tlm.MarginTraining, keras.Model):

    def __init__(self):
      super().__init__(margin=tlm.LayerMargin(gamma=1.0), margin_layers=["h"])
      self.hidden = keras.layers.Dense(3)

    def margin_endpoints(self, x, training=False):
      h = self.hidden(x)
      return h, [h]

  inputs = keras.Input((4,))
  h = keras.layers.Dense(3, activity_regularizer="l2", name="h")(inputs)
  regularized = tlm.MarginModel(
      inputs, h, margin=tlm.LayerMargin(gamma=1.0), margin_layers=["h"]
  )
  x, y = data((2, 4), 3)
  return {
      "error/subclassed": error_message(lambda: Subclassed().layer_distances(x, y)),
      "error/activity": error_message(lambda: regularized.layer_distances(x, y)),
  }


def main(out):
  results = {}
  run("skip", skip_model, results)
  run("paper", paper_model, results)
  if BACKEND == "jax":
    results.update(unsupported_errors())
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2, devices
    parallel = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(parallel)
    run("skip_parallel", skip_model, results, train_only=True)
    run("paper_parallel", paper_model, results, train_only=True)
  np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1])
