"""Reading a Keras model as a chain of operations: the functional graph is walked
through the public config (shared layers, nested models, calls outside the model),
and the operations reproduce the model's logits."""

import keras
import numpy as np
import pytest

from tf_large_margin import bound_network
from tf_large_margin import bound_operations
from tf_large_margin import certified

DIM = 5


def inputs():
  return keras.Input((DIM,))


def x_batch(seed=0):
  return np.random.default_rng(seed).normal(size=(4, DIM)).astype("float32")


def assert_reproduces(model, x):
  """The parsed operations give the model's logits (interval bounds at eps = 0)."""
  lower, upper = certified.interval_bounds(model, x, 0.0)
  np.testing.assert_allclose(lower, model(x).numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lower, upper, rtol=0, atol=1e-12)


def test_shared_layer_is_read_once_per_call():
  """A layer applied twice, the output being its second call."""
  x = inputs()
  shared = keras.layers.Dense(DIM, name="shared")
  h = keras.layers.ReLU(name="relu")(shared(x))
  model = keras.Model(x, shared(h))
  names = [layer.name for layer in bound_network.functional_chain(model)]
  assert names == ["shared", "relu", "shared"]
  assert_reproduces(model, x_batch())


def test_nested_functional_model_called_in_several_models():
  """A functional model first used in one model, then (its second call) after a
  layer of another: only the calls of the model read count."""
  inner_input = inputs()
  hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inner_input)
  inner = keras.Model(inner_input, keras.layers.Dense(3, name="logits")(hidden))
  first = inputs()
  keras.Model(first, inner(first))
  x = inputs()
  outer = keras.Model(x, inner(keras.layers.Dense(DIM, name="before")(x)))
  names = [layer.name for layer in bound_network.functional_chain(outer)]
  assert names == ["before", inner.name]
  chain = [layer.name for layer in bound_network.layer_chain(outer)]
  assert chain[0] == "before" and chain[-2:] == ["hidden", "logits"]
  assert_reproduces(outer, x_batch(1))


def test_network_sets_the_shapes_of_the_operations():
  x = inputs()
  model = keras.Model(
      x, keras.layers.Dense(3)(keras.layers.Dense(4, activation="relu")(x))
  )
  operations = bound_network.network(model, (DIM,))
  kinds = [type(operation) for operation in operations]
  assert kinds == [
      bound_operations.Dense,
      bound_operations.ReLU,
      bound_operations.Dense,
  ]
  shapes = [(op.in_shape, op.out_shape) for op in operations]
  assert shapes == [((DIM,), (4,)), ((4,), (4,)), ((4,), (3,))]


@pytest.mark.parametrize("pool", ["max", "average"])
def test_pooling_operations_share_the_window(pool):
  """MaxPooling and AveragePooling read the same window settings (`Pooling`)."""
  layer_class = {
      "max": keras.layers.MaxPooling2D,
      "average": keras.layers.AveragePooling2D,
  }[pool]
  layer = layer_class(3, strides=2, padding="same")
  (operation,) = bound_network.layer_operations(layer, (6, 6, 2))
  assert isinstance(operation, bound_operations.Pooling)
  assert (operation.pool_size, operation.strides, operation.padding) == (
      (3, 3),
      (2, 2),
      "SAME",
  )
  h = np.random.default_rng(2).normal(size=(2, 6, 6, 2))
  np.testing.assert_allclose(operation.apply(h), layer(h), rtol=1e-6)
