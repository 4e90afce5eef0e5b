"""Jacobian regulariser against explicit per-example Jacobians."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin.jacobian import JacobianModel
from tf_large_margin.jacobian import jacobian_penalty

rng = np.random.default_rng(0)
X = rng.normal(size=(4, 3, 3, 1))
W1 = tf.Variable(rng.normal(size=(9, 5)))
V = tf.Variable(rng.normal(size=(5, 3)))


def features_of(x):
  return tf.tanh(tf.reshape(x, [x.shape[0], -1]) @ W1)


def explicit_penalty(class_indices):
  """sum_i ||(v/||v||)^T J(x_i)||_2 with the full Jacobian of each example."""
  v = V.numpy()
  total = 0.0
  for i in range(len(X)):
    x = tf.constant(X[i : i + 1])
    with tf.GradientTape() as tape:
      tape.watch(x)
      f = features_of(x)
    jac = tape.jacobian(f, x).numpy().reshape(5, -1)  # [F, input]
    classes = range(3) if class_indices is None else [class_indices[i]]
    for c in classes:
      direction = v[:, c] / np.linalg.norm(v[:, c])
      total += np.linalg.norm(direction @ jac)
  return total


def library_penalty(class_indices):
  x = tf.constant(X)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    f = features_of(x)
  return jacobian_penalty(x, f, V, tape, class_indices)


@pytest.mark.parametrize("class_indices", [None, np.array([2, 0, 1, 2])])
def test_penalty_equals_explicit_jacobians(class_indices):
  np.testing.assert_allclose(
      library_penalty(class_indices).numpy(),
      explicit_penalty(class_indices),
      rtol=1e-10,
  )


def test_gradient_flows_to_the_feature_extractor():
  with tf.GradientTape() as outer:
    penalty = library_penalty(None)
  grad_w1, grad_v = outer.gradient(penalty, [W1, V])
  step, index = 1e-6, (4, 2)
  original = W1.numpy()
  values = []
  for sign in (1, -1):
    perturbed = original.copy()
    perturbed[index] += sign * step
    W1.assign(perturbed)
    values.append(explicit_penalty(None))
  W1.assign(original)
  np.testing.assert_allclose(
      grad_w1.numpy()[index], (values[0] - values[1]) / (2 * step), rtol=1e-6
  )
  assert np.abs(grad_v.numpy()).max() > 0


def make_model(**kwargs):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((3, 3, 1))
  h = keras.layers.Dense(5, activation="tanh", name="features")(
      keras.layers.Flatten()(inputs)
  )
  logits = keras.layers.Dense(3, name="classifier")(h)
  return JacobianModel(inputs, logits, feature_layer="features", **kwargs)


def test_step_adds_the_scaled_penalty():
  x, y = X.astype("float32"), np.array([0, 1, 2, 1])
  model = make_model(jacobian_weight=0.7, variant="all", classifier_weight=0.1)
  model.compile(
      keras.optimizers.SGD(0.0),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  logs = model.test_on_batch(x, y, return_dict=True)
  xt = tf.constant(x)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(xt)
    features = model.get_layer("features")(model.layers[1](xt))
  kernel = model.get_layer("classifier").kernel
  penalty = jacobian_penalty(xt, features, kernel, tape).numpy()
  xent = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
  expected = xent.numpy().mean() + 0.7 * penalty / 4 + 0.1 * np.sum(kernel.numpy() ** 2)
  np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(logs["jacobian"], 0.7 * penalty / 4, rtol=1e-5)


def test_training_lowers_the_penalty_and_round_trips(tmp_path):
  x = rng.uniform(size=(64, 3, 3, 1)).astype("float32")
  y = (x.reshape(64, -1).sum(1) > 4.5).astype("int64")
  model = make_model(jacobian_weight=5.0, seed=1)
  model.compile(
      keras.optimizers.Adam(1e-2),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  before = model.evaluate(x, y, verbose=0, return_dict=True)["jacobian"]
  model.fit(x, y, epochs=20, verbose=0)
  assert model.evaluate(x, y, verbose=0, return_dict=True)["jacobian"] < 0.5 * before
  path = str(tmp_path / "j.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert (loaded.feature_layer, loaded.jacobian_weight, loaded.seed) == (
      "features",
      5.0,
      1,
  )
  np.testing.assert_array_equal(
      loaded.predict(x, verbose=0), model.predict(x, verbose=0)
  )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="some"), "variant"),
        (dict(jacobian_weight=-1.0), "jacobian_weight"),
        (dict(classifier_weight=-1.0), "classifier_weight"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_model(**kwargs)


def test_output_must_be_a_dense_classifier_on_the_features():
  inputs = keras.Input((4,))
  h = keras.layers.Dense(5, name="features")(inputs)
  logits = keras.layers.Activation("tanh")(keras.layers.Dense(3)(h))
  with pytest.raises(ValueError, match="must be a Dense layer applied to 'features'"):
    JacobianModel(inputs, logits, feature_layer="features")
