"""Jacobian regulariser against explicit per-example Jacobians."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin.jacobian import JacobianModel
from tf_large_margin.jacobian import jacobian_penalty
from tf_large_margin.margin_loss import safe_norm

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
  # Loading compiles it again (the library's compile hook keeps Keras'
  # compile_from_config working): the same loss and optimizer state.
  assert loaded.compiled and isinstance(loaded.optimizer, keras.optimizers.Adam)
  assert isinstance(loaded.loss, keras.losses.SparseCategoricalCrossentropy)
  assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)


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


def one_sgd_step(model, x, y, sample_weight=None, learning_rate=0.1, loss=None):
  """(logs, weight changes) of one SGD step of ``model`` on (x, y)."""
  model.compile(
      keras.optimizers.SGD(learning_rate),
      loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  before = [w.numpy() for w in model.trainable_weights]
  logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
  return logs, [w.numpy() - b for w, b in zip(model.trainable_weights, before)]


def zero_loss(y_true, y_pred):
  """A compiled loss of 0, so that a step follows the penalty's gradient alone."""
  del y_true
  return tf.zeros_like(y_pred[:, 0])


@pytest.mark.parametrize(
    "policy,rtol", [("mixed_bfloat16", 5e-2), ("mixed_float16", 1e-2)]
)
# zero_loss: the classifier bias gets no gradient.
@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_mixed_precision_step_follows_the_float32_penalty_gradient(policy, rtol):
  """Under a mixed policy the features are float16/bfloat16: the step is finite and
  its change of the weights, -lr * grad (jacobian_weight / batch) * penalty, matches
  float32 to the half-precision rounding (eps 2^-7 and 2^-10), relative to the
  largest change."""
  x, y = X.astype("float32"), np.array([0, 1, 2, 1])
  full = make_model(jacobian_weight=2.0, variant="all")
  keras.mixed_precision.set_dtype_policy(policy)
  try:
    mixed = make_model(jacobian_weight=2.0, variant="all")
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  assert mixed.get_layer("features").compute_dtype == policy.split("_")[1]
  mixed.set_weights(full.get_weights())
  full_logs, full_changes = one_sgd_step(full, x, y, loss=zero_loss)
  mixed_logs, mixed_changes = one_sgd_step(mixed, x, y, loss=zero_loss)
  assert np.isfinite(mixed_logs["loss"]) and mixed_logs["jacobian"] > 0
  np.testing.assert_allclose(mixed_logs["jacobian"], full_logs["jacobian"], rtol=rtol)
  for mixed_change, full_change in zip(mixed_changes, full_changes):
    assert np.all(np.isfinite(mixed_change))
    np.testing.assert_allclose(
        mixed_change, full_change, atol=rtol * np.abs(full_change).max()
    )
  assert np.abs(mixed_changes[0]).max() > 0  # the feature kernel moved


def dead_relu_model():
  """x -> relu(x K) ("features", K > 0) -> logits: an example x < 0 has features 0
  and a zero feature Jacobian."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  h = keras.layers.Dense(5, activation="relu", name="features")(inputs)
  logits = keras.layers.Dense(3, name="classifier")(h)
  model = JacobianModel(
      inputs, logits, feature_layer="features", jacobian_weight=0.7, variant="all"
  )
  kernel = np.abs(np.random.default_rng(1).normal(size=(4, 5))) + 0.1
  model.get_layer("features").set_weights([kernel, np.zeros(5)])
  return model


def test_an_example_with_a_zero_jacobian_adds_nothing():
  """||v^T J(x_0)||_2 = 0 has the subgradient 0, not NaN: with the dead example
  weighted 0, the step is 3/4 of the step on the 3 other examples (every term is
  divided by the batch size, 4 instead of 3)."""
  x = np.abs(rng.normal(size=(4, 4))).astype("float32") + 0.1
  x[0] *= -1.0
  y = np.array([0, 1, 2, 1])
  model = dead_relu_model()
  np.testing.assert_array_equal(model.get_layer("features")(x[:1]), 0.0)
  logs, changes = one_sgd_step(model, x, y, sample_weight=np.array([0.0, 1, 1, 1]))
  reference_logs, reference_changes = one_sgd_step(dead_relu_model(), x[1:], y[1:])
  for change, reference in zip(changes, reference_changes):
    assert np.all(np.isfinite(change))
    np.testing.assert_allclose(change, 0.75 * reference, atol=1e-6)
  # float32 sums in a different order (3 vs 4 rows): 1 ulp apart on some CPUs.
  np.testing.assert_allclose(
      logs["jacobian"], 0.75 * reference_logs["jacobian"], rtol=1e-6
  )
  assert np.abs(changes[0]).max() > 0


def test_safe_norm_has_gradient_zero_at_zero():
  x = tf.constant([[0.0, 0.0, 0.0], [3.0, 0.0, -4.0]], tf.float64)
  with tf.GradientTape() as tape:
    tape.watch(x)
    norms = safe_norm(x, axis=1)
  np.testing.assert_array_equal(norms, tf.norm(x, axis=1))
  np.testing.assert_allclose(
      tape.gradient(norms, x), [[0.0, 0.0, 0.0], [0.6, 0.0, -0.8]], rtol=1e-15
  )


def test_a_zero_classifier_row_adds_nothing():
  """v = 0 has no direction: its terms are 0 (not NaN) and so is their gradient."""
  padded = tf.Variable(tf.concat([V, tf.zeros([5, 1], V.dtype)], axis=1))
  x = tf.constant(X)
  with tf.GradientTape() as outer:
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      f = features_of(x)
    penalty = jacobian_penalty(x, f, padded, tape)
  np.testing.assert_allclose(penalty, explicit_penalty(None), rtol=1e-10)
  grad_w1, grad_v = outer.gradient(penalty, [W1, padded])
  assert np.all(np.isfinite(grad_w1)) and np.all(np.isfinite(grad_v))
  np.testing.assert_array_equal(grad_v[:, 3], 0.0)


def test_half_precision_features_give_a_float32_penalty():
  x = tf.constant(X, tf.bfloat16)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    f = tf.tanh(tf.reshape(x, [4, -1]) @ tf.cast(W1, tf.bfloat16))
  penalty = jacobian_penalty(x, f, V, tape)
  assert penalty.dtype == tf.float32
  np.testing.assert_allclose(penalty, explicit_penalty(None), rtol=2e-2)
