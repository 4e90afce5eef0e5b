"""Margin estimates against exact distances on affine classifiers; DeepFool vs PGD."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import attacks
from tf_large_margin import margin_loss
from tf_large_margin import margin_estimation

NORMS = [1, 2, np.inf]
DUAL = {1: np.inf, 2: 2, np.inf: 1}  # the gradient norm q of each distance norm p
DIM = 5


def dense_model(w, b, name="logits"):
  model = keras.Sequential(
      [keras.Input((w.shape[0],)), keras.layers.Dense(w.shape[1], name=name)]
  )
  model.layers[0].set_weights([w.astype("float32"), b.astype("float32")])
  return model


def affine_problem(classes, n=12, seed=0):
  rng = np.random.default_rng(seed)
  w, b = rng.normal(size=(DIM, classes)), 0.3 * rng.normal(size=classes)
  x = rng.normal(size=(n, DIM)).astype("float32")
  return w, b, x


def exact_distance(w, b, x, labels, norm):
  """min_{k != y} ((w_y - w_k) x + b_y - b_k) / ||w_y - w_k||_q, in float64: the
  exact distance to the boundary for correct labels, negative for wrong ones."""
  z = x.astype(np.float64) @ w + b
  distances = []
  for z_i, y in zip(z, labels):
    distances.append(
        min(
            (z_i[y] - z_i[k]) / np.linalg.norm(w[:, y] - w[:, k], DUAL[norm])
            for k in range(w.shape[1])
            if k != y
        )
    )
  return np.array(distances)


@pytest.mark.parametrize("norm", NORMS)
def test_deepfool_is_exact_on_an_affine_classifier(norm):
  w, b, x = affine_problem(classes=4)
  model = dense_model(w, b)
  labels = np.argmax(model(x), axis=1)
  exact = exact_distance(w, b, x, labels, norm)
  np.testing.assert_allclose(
      margin_estimation.linearized_margins(model, x, labels, norm), exact, rtol=1e-4
  )
  wrong = (labels + 1) % 4
  signed = margin_estimation.linearized_margins(model, x, wrong, norm)
  np.testing.assert_allclose(signed, exact_distance(w, b, x, wrong, norm), rtol=1e-4)
  assert np.all(signed < 0)
  x_adv, distances = margin_estimation.deepfool(model, x, labels, norm=norm, overshoot=0.02)
  np.testing.assert_allclose(distances, 1.02 * exact, rtol=1e-4)
  assert np.all(np.argmax(model(x_adv), axis=1) != labels)
  # One linearisation step reaches the closest boundary of an affine model.
  _, one_step = margin_estimation.deepfool(model, x, labels, norm=norm, max_iter=1)
  np.testing.assert_allclose(one_step, distances, rtol=1e-6)


def test_deepfool_reports_zero_and_inf():
  w, b, x = affine_problem(classes=3, n=4)
  model = dense_model(w, b)
  labels = np.argmax(model(x), axis=1)
  wrong = (labels + 1) % 3
  _, distances = margin_estimation.deepfool(model, x, wrong)
  np.testing.assert_array_equal(distances, 0.0)  # misclassified from the start
  constant = dense_model(np.zeros((DIM, 3)), np.array([1.0, 0.0, 0.0]))  # no gradient
  _, distances = margin_estimation.deepfool(constant, x, np.zeros(4, np.int64))
  assert np.all(np.isinf(distances))  # never flipped: no upper bound


@pytest.mark.parametrize("norm", NORMS)
def test_first_order_margin_on_a_two_class_affine_model(norm):
  """p_y - p_j = tanh(u / 2) for the logit gap u, so d = sinh(u) / ||w_y - w_j||_q."""
  w, b, x = affine_problem(classes=2, n=40, seed=1)
  x *= 0.5  # logit gaps |u| of a few units
  model = dense_model(w, b)
  labels = np.arange(40) % 2  # half of them misclassified
  found, correct = margin_estimation.first_order_margins(
      model, x, labels, dist_norm=norm, epsilon=0.0
  )
  z = x.astype(np.float64) @ w + b
  gap = z[np.arange(40), labels] - z[np.arange(40), 1 - labels]
  scale = np.linalg.norm(w[:, 0] - w[:, 1], DUAL[norm])
  np.testing.assert_allclose(found["input"], np.sinh(gap) / scale, rtol=1e-4)
  np.testing.assert_array_equal(correct, gap > 0)
  # Hence: the same sign as the exact distance gap / scale, never smaller in
  # magnitude, and equal to first order in the gap.
  exact = gap / scale
  assert np.all(np.sign(found["input"]) == np.sign(exact))
  assert np.all(np.abs(found["input"]) >= np.abs(exact) * (1 - 1e-5))
  small = np.abs(gap) < 0.05
  assert small.sum() >= 1
  np.testing.assert_allclose(found["input"][small], exact[small], rtol=1e-3)


@pytest.mark.parametrize("norm", NORMS)
def test_first_order_margin_at_hidden_layers(norm):
  """x -> h = x A (layer "h") -> logits = h W + b: at "h" the classifier is affine in h
  with weights W; at the logits its weights are the identity."""
  rng = np.random.default_rng(2)
  a, w, b = rng.normal(size=(DIM, 7)), rng.normal(size=(7, 2)), rng.normal(size=2)
  inputs = keras.Input((DIM,))
  h = keras.layers.Dense(7, use_bias=False, name="h")(inputs)
  model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(h))
  model.get_layer("h").set_weights([a.astype("float32")])
  model.get_layer("logits").set_weights([w.astype("float32"), b.astype("float32")])
  x = 0.3 * rng.normal(size=(10, DIM)).astype("float32")
  labels = np.zeros(10, np.int64)
  found, _ = margin_estimation.first_order_margins(
      model, x, labels, ["input", "h", "logits"], dist_norm=norm, epsilon=0.0
  )
  z = (x.astype(np.float64) @ a) @ w + b
  sinh_gap = np.sinh(z[:, 0] - z[:, 1])
  expected = {
      "input": sinh_gap / np.linalg.norm(a @ (w[:, 0] - w[:, 1]), DUAL[norm]),
      "h": sinh_gap / np.linalg.norm(w[:, 0] - w[:, 1], DUAL[norm]),
      "logits": sinh_gap / np.linalg.norm([1.0, -1.0], DUAL[norm]),
  }
  for name, values in expected.items():
    np.testing.assert_allclose(found[name], values, rtol=1e-4, err_msg=name)


def test_first_order_margins_equal_the_core_distances():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((DIM,))
  h = keras.layers.Dense(8, activation="tanh", name="h")(inputs)
  model = keras.Model(inputs, keras.layers.Dense(4)(h))
  x = tf.random.normal([6, DIM])
  labels = np.array([0, 1, 2, 3, 0, 1])
  found, _ = margin_estimation.first_order_margins(
      model, x, labels, ["input", "h"], dist_norm=2, top_k=3
  )
  endpoints = keras.Model(inputs, [model.output, h])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    logits, hidden = endpoints(x)
  _, (at_input, at_h) = margin_loss.margin_distances(
      logits=logits,
      one_hot_labels=tf.one_hot(labels, 4),
      layers_list=[x, hidden],
      top_k=3,
      tape=tape,
  )
  np.testing.assert_allclose(found["input"], tf.reduce_min(at_input, 1), rtol=1e-5)
  np.testing.assert_allclose(found["h"], tf.reduce_min(at_h, 1), rtol=1e-5)


def relu_problem(n=48):
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
      [
          keras.Input((6,)),
          keras.layers.Dense(32, activation="relu"),
          keras.layers.Dense(32, activation="relu"),
          keras.layers.Dense(4),
      ]
  )
  x = np.random.default_rng(0).uniform(0.0, 1.0, size=(n, 6)).astype("float32")
  return model, x, np.argmax(model(x), axis=1)


@pytest.mark.parametrize("norm", [2, np.inf])
def test_deepfool_flips_a_relu_network_and_is_no_larger_than_pgd(norm):
  model, x, labels = relu_problem()
  x_adv, distances = margin_estimation.deepfool(model, x, labels, norm=norm)
  assert np.all(np.argmax(model(x_adv), axis=1) != labels)
  np.testing.assert_allclose(
      margin_loss.flat_norm(x_adv - x, norm), distances, rtol=1e-6
  )
  # The smallest radius on a grid (ratio 1.1) at which a 40-step PGD flips each
  # example; PGD is not clipped to a range, as DeepFool.
  needed = np.full(len(x), np.inf)
  for epsilon in np.geomspace(2 * distances.max(), distances.min() / 4, 25):
    x_pgd = attacks.pgd(
        model,
        x,
        labels,
        epsilon,
        norm=norm,
        steps=40,
        step_size=epsilon / 8,
        clip_min=-np.inf,
        clip_max=np.inf,
    )
    needed[np.argmax(model(x_pgd), axis=1) != labels] = epsilon
  ratio = distances / needed
  # DeepFool is a first-order heuristic, not an optimum: on a ReLU network PGD needs
  # more than DeepFool's radius for most examples, not all (measured: 80 %, the
  # largest ratio 1.6).
  assert np.median(ratio) < 1.0
  assert np.mean(ratio <= 1.0) >= 0.7
  assert ratio.max() < 2.0


@contextlib.contextmanager
def dtype_policy(name):
  """Keras's global dtype policy set to ``name`` inside the block."""
  keras.mixed_precision.set_dtype_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "policy,dtype,rtol",
    [("mixed_float16", "float16", 1e-2), ("mixed_bfloat16", "bfloat16", 5e-2)],
)
@pytest.mark.parametrize("norm", NORMS)
def test_half_precision_logits_give_the_float32_margins(policy, dtype, rtol, norm):
  """A model with float16 (bfloat16) logits: float32 margins, finite, close to those
  of the same weights in float32 where the rounding of the logits (eps |z|, eps =
  2^-10 or 2^-7) is small next to the logit gap and DeepFool's first choice of
  boundary is unambiguous (a near tie sends the two models down different paths)."""
  with dtype_policy(policy):
    half, x, _ = relu_problem()
  full, _, labels = relu_problem()
  full.set_weights(half.get_weights())
  assert half(x).dtype == dtype

  linearized = margin_estimation.linearized_margins(half, x, labels, norm)
  x_adv, distances = margin_estimation.deepfool(half, x, labels, norm=norm)
  assert linearized.dtype == np.float32 and distances.dtype == np.float32
  assert x_adv.dtype == tf.float32
  assert np.all(np.isfinite(linearized)) and np.all(np.isfinite(distances))
  assert np.all(np.argmax(half(x_adv), axis=1) != labels)

  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    logits = full(xt)
  _, _, boundaries = margin_estimation.linearized_boundaries(
      logits, tape.batch_jacobian(logits, xt), labels, norm
  )
  nearest = np.sort(np.abs(boundaries.numpy()), axis=1)
  top = np.sort(logits.numpy(), axis=1)
  keep = (top[:, -1] - top[:, -2] > 0.3 * np.abs(top).max(axis=1)) & (
      nearest[:, 1] > 1.02 * nearest[:, 0]
  )
  assert keep.sum() >= 20
  np.testing.assert_allclose(
      linearized[keep],
      margin_estimation.linearized_margins(full, x, labels, norm)[keep],
      rtol=rtol,
  )
  np.testing.assert_allclose(
      distances[keep],
      margin_estimation.deepfool(full, x, labels, norm=norm)[1][keep],
      rtol=rtol,
  )


@pytest.mark.parametrize("norm", NORMS)
def test_float64_logits(norm):
  w, b, x = affine_problem(classes=4)
  model = keras.Sequential(
      [keras.Input((DIM,), dtype="float64"), keras.layers.Dense(4, dtype="float64")]
  )
  model.layers[0].set_weights([w, b])
  labels = np.argmax(model(x), axis=1)
  exact = exact_distance(w, b, x, labels, norm)
  linearized = margin_estimation.linearized_margins(model, x, labels, norm)
  assert linearized.dtype == np.float64
  np.testing.assert_allclose(linearized, exact, rtol=1e-6)
  _, distances = margin_estimation.deepfool(model, x, labels, norm=norm)
  assert distances.dtype == np.float32
  np.testing.assert_allclose(distances, 1.02 * exact, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_estimators_take_tensors_of_any_float_dtype(dtype):
  """Regression: a model built with dtype="float16" is fed float16 tf.Tensors, and
  tf.convert_to_tensor(x, tf.float32) raised ValueError for them (it casts arrays and
  lists, not tensors). The estimators cast x to float32: the margins are those of
  the same values given as a float32 array, or as nested lists."""
  w, b, x = affine_problem(classes=4)
  model = keras.Sequential(
      [keras.Input((DIM,), dtype=dtype), keras.layers.Dense(4, dtype=dtype)]
  )
  model.layers[0].set_weights([w, b])
  tensor = tf.cast(x, dtype)
  values = tf.cast(tensor, tf.float32).numpy()
  labels = np.argmax(to_float64(model(tensor)), axis=1)
  for norm in NORMS:
    for given in (tensor, values.tolist()):
      np.testing.assert_array_equal(
          margin_estimation.linearized_margins(model, given, labels, norm),
          margin_estimation.linearized_margins(model, values, labels, norm),
      )
      x_adv, distances = margin_estimation.deepfool(model, given, labels, norm)
      expected_adv, expected = margin_estimation.deepfool(model, values, labels, norm)
      np.testing.assert_array_equal(x_adv, expected_adv)
      np.testing.assert_array_equal(distances, expected)
      assert np.all(np.isfinite(distances)) and np.all(distances > 0)
      found, correct = margin_estimation.first_order_margins(
          model, given, labels, ["input"], dist_norm=norm
      )
      np.testing.assert_array_equal(
          found["input"],
          margin_estimation.first_order_margins(
              model, values, labels, ["input"], dist_norm=norm
          )[0]["input"],
      )
      assert np.all(correct)


def to_float64(tensor):
  return tf.cast(tensor, tf.float64).numpy()


def test_deepfool_step_covers_the_logit_resolution():
  """On a tie of rounded logits (f = 0, prediction unchanged) the plain step is 0;
  with a resolution the step reaches f = resolution on the linearised boundary."""
  logits = tf.constant([[1.0, 1.0, -0.5]], tf.float16)
  gradients = tf.constant([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
  labels = tf.constant([0])
  np.testing.assert_array_equal(
      margin_estimation.deepfool_step(logits, gradients, labels, 2), [[0.0, 0.0]]
  )
  resolution = margin_estimation.logit_resolution(logits)
  np.testing.assert_allclose(resolution, [2.0**-10])
  step = margin_estimation.deepfool_step(logits, gradients, labels, 2, resolution)
  assert step.dtype == tf.float32
  # w = grad z_1 - grad z_0 = (-1, 2): r = resolution / ||w||_2 * w / ||w||_2.
  np.testing.assert_allclose(step, [[-(2.0**-10) / 5, 2 * 2.0**-10 / 5]], rtol=1e-6)


def test_dataset_margins_and_summaries():
  model, x, labels = relu_problem(n=30)
  labels[:6] = (labels[:6] + 1) % 4  # 6 misclassified
  dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(8)
  seen = []
  result = margin_estimation.dataset_margins(
      model, dataset, layers=["input"], dist_norm=np.inf, progress=seen.append
  )
  assert seen == [0, 1, 2, 3]
  assert sorted(result) == ["correct", "deepfool", "input", "linearized"]
  np.testing.assert_allclose(
      result["linearized"],
      margin_estimation.linearized_margins(model, x, labels, np.inf),
      rtol=1e-5,  # float32 matmuls round differently for batches of 8 and of 30
  )
  np.testing.assert_array_equal(result["correct"], np.arange(30) >= 6)
  direct, _ = margin_estimation.first_order_margins(model, x, labels, dist_norm=np.inf)
  np.testing.assert_allclose(
      result["input"], direct["input"], rtol=1e-5  # batches of 8 vs 30, as above
  )
  assert np.all(result["input"][:6] < 0) and np.all(result["input"][6:] > 0)
  np.testing.assert_array_equal(result["deepfool"][:6], 0.0)

  summary = margin_estimation.summarize_margins(result, thresholds=[0.05, 10.0])
  correct_margins = result["input"][6:]
  assert summary["input"]["count"] == 24
  assert summary["input"]["median"] == pytest.approx(np.median(correct_margins))
  assert summary["input"]["quantiles"]["0.25"] == pytest.approx(
      np.quantile(correct_margins, 0.25)
  )
  assert summary["input"]["fraction_below"]["0.05"] == pytest.approx(
      np.mean(correct_margins < 0.05)
  )
  assert summary["input"]["fraction_below"]["10.0"] == 1.0
  everything = margin_estimation.summarize_margins(result, only_correct=False)
  assert everything["deepfool"]["count"] == 30
  assert everything["input"]["median"] == pytest.approx(np.median(result["input"]))
  assert margin_estimation.summarize([])["median"] is None


def test_margin_model_with_its_own_margin_layers():
  inputs = keras.Input((DIM,))
  h = keras.layers.Dense(8, activation="relu", name="h")(inputs)
  model = tlm.MarginModel(
      inputs, keras.layers.Dense(3)(h), margin_layers=["input", "h"]
  )
  assert margin_estimation.layer_endpoints(model, ["input", "h"]) is model
  x, labels = np.ones((2, DIM), np.float32), np.array([0, 1])
  found, _ = margin_estimation.first_order_margins(model, x, labels, ["h"])
  assert sorted(found) == ["h"]


class TestErrors:

  def setup_method(self):
    self.model, self.x, self.labels = relu_problem(n=4)

  @pytest.mark.parametrize("norm", [3, 0, "l2"])
  def test_unknown_norm(self, norm):
    with pytest.raises(ValueError, match="1, 2 or np.inf"):
      margin_estimation.deepfool(self.model, self.x, self.labels, norm=norm)
    with pytest.raises(ValueError, match="1, 2 or np.inf"):
      margin_estimation.first_order_margins(self.model, self.x, self.labels, dist_norm=norm)
    with pytest.raises(ValueError, match="1, 2 or np.inf"):
      margin_estimation.linearized_margins(self.model, self.x, self.labels, norm=norm)

  def test_bad_arguments(self):
    with pytest.raises(ValueError, match="max_iter"):
      margin_estimation.deepfool(self.model, self.x, self.labels, max_iter=0)
    with pytest.raises(ValueError, match="overshoot"):
      margin_estimation.deepfool(self.model, self.x, self.labels, overshoot=-0.1)
    with pytest.raises(ValueError, match="layers is empty"):
      margin_estimation.first_order_margins(self.model, self.x, self.labels, layers=[])
    with pytest.raises(ValueError, match="Unknown (margin )?layer 'nope'"):
      margin_estimation.first_order_margins(self.model, self.x, self.labels, layers=["nope"])
    for top_k in (0, 4, 1.5):
      with pytest.raises(
          ValueError, match=r"top_k must be an integer in \[1, classes - 1 = 3\]"
      ):
        margin_estimation.first_order_margins(self.model, self.x, self.labels, top_k=top_k)
    with pytest.raises(ValueError, match="quantiles"):
      margin_estimation.summarize([1.0], quantiles=[1.5])
    for name in ("correct", "deepfool", "linearized"):
      with pytest.raises(ValueError, match="reserved"):
        margin_estimation.dataset_margins(self.model, [], layers=["input", name])
    with pytest.raises(ValueError, match="empty"):
      margin_estimation.dataset_margins(self.model, [])

  def test_bad_labels_and_model(self):
    with pytest.raises(ValueError, match=r"labels\[0\] = 7"):
      margin_estimation.deepfool(self.model, self.x, np.array([7, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"labels\[3\] = -2"):
      margin_estimation.first_order_margins(self.model, self.x, np.array([0, 0, 0, -2]))
    inputs = keras.Input((6,))
    flat_output = keras.Model(inputs, keras.layers.Dense(1)(inputs)[:, 0])
    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
      margin_estimation.deepfool(flat_output, self.x, self.labels)
