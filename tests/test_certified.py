"""Certified margin bounds: exact on affine models, sound on random ReLU CNNs (no
sampled point of the certified ball changes the prediction), below DeepFool, CROWN
at least as tight as IBP, and the errors."""

import functools

import keras
import numpy as np
import pytest

from tf_large_margin import architectures
from tf_large_margin import attacks
from tf_large_margin import certified
from tf_large_margin import margin_estimation
from tf_large_margin.normalization import BatchNormalizationTF1

NORMS = [np.inf, 2]
DUAL = {np.inf: 1, 2: 2}  # the norm of W_y - W_j in the distance for each ball
METHODS = ["ibp", "crown-ibp", "crown"]
DIM, CLASSES = 5, 4
SAMPLES = 128
# The methods tested on each CNN variant (full CROWN on the first only, for time).
CNN_METHODS = {0: METHODS, 1: METHODS[:2]}


# ---------------------------------------------------------------------------
# Models and helpers
# ---------------------------------------------------------------------------


def affine_model(input_shape=(DIM,), seed=0):
  """logits = flatten(x) W + b, and (W, b) in float64."""
  rng = np.random.default_rng(seed)
  dim = int(np.prod(input_shape))
  w, b = rng.normal(size=(dim, CLASSES)), 0.3 * rng.normal(size=CLASSES)
  model = keras.Sequential(
      [keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(CLASSES)]
  )
  model.layers[-1].set_weights([w.astype("float32"), b.astype("float32")])
  return model, w.astype("float32").astype(np.float64), b.astype("float32")


def exact_distance(w, b, x, labels, norm):
  """min_{j != y} (z_y - z_j) / ||W_y - W_j||_q: the distance to the boundary."""
  x = x.reshape(len(x), -1).astype(np.float64)
  z = x @ w + b
  return np.array(
      [
          min(
              (z_i[y] - z_i[j]) / np.linalg.norm(w[:, y] - w[:, j], DUAL[norm])
              for j in range(CLASSES)
              if j != y
          )
          for z_i, y in zip(z, labels)
      ]
  )


def randomize_batch_norm(layer, rng):
  """Non-trivial gamma, beta and moving statistics."""
  channels = layer.gamma.shape[0]
  layer.set_weights(
      [
          rng.uniform(0.5, 2.0, channels),
          0.3 * rng.normal(size=channels),
          0.3 * rng.normal(size=channels),
          rng.uniform(0.2, 2.0, channels),
      ]
  )


@functools.lru_cache(maxsize=None)
def random_cnn(variant, seed=0):
  """A small ReLU CNN: conv(relu) - ReLU - max-pool - BN - conv - ... - dense, inputs
  and its predictions (cached: the tests do not modify them).

  variant 0: same padding, no bias, strided valid conv, flatten, dense(relu).
  variant 1: valid padding, bias, overlapping same max-pool, average pooling,
  batch norm after a dense layer (BatchNormalizationTF1), Activation("relu").
  """
  keras.utils.set_random_seed(seed)
  rng = np.random.default_rng(seed)
  inputs = keras.Input((8, 8, 2))
  if variant == 0:
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, activation="relu")(
        inputs
    )
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2D(4, 3, strides=2, padding="valid")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
  else:
    h = keras.layers.Conv2D(3, 3, padding="valid", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(3, strides=1, padding="same")(h)
    h = BatchNormalizationTF1(epsilon=1e-5)(h)
    h = keras.layers.Conv2D(4, 2, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.AveragePooling2D(2, padding="same")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(12)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
  logits = keras.layers.Dense(3)(h)
  model = keras.Model(inputs, logits)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      randomize_batch_norm(layer, rng)
  x = rng.normal(size=(3, 8, 8, 2)).astype("float32")
  return model, x, np.argmax(model(x), axis=1)


@functools.lru_cache(maxsize=None)
def random_mlp(seed=0):
  """A ReLU MLP, inputs and its predictions (cached)."""
  keras.utils.set_random_seed(seed)
  model = keras.Sequential(
      [
          keras.Input((DIM,)),
          keras.layers.Dense(16, activation="relu"),
          keras.layers.Dense(16, activation="relu"),
          keras.layers.Dense(CLASSES),
      ]
  )
  x = np.random.default_rng(seed).normal(size=(8, DIM)).astype("float32")
  return model, x, np.argmax(model(x), axis=1)


@functools.lru_cache(maxsize=None)
def cnn_radii(variant, norm, method):
  """Certified radii of the `random_cnn` (cached across tests)."""
  model, x, labels = random_cnn(variant)
  return certified.certified_radius(
      model, x, labels, norm=norm, method=method, max_radius=1.0, steps=7
  )


def cnn_cases(*with_method):
  """(variant, norm[, method]) parameters of the CNN tests."""
  if not with_method:
    return [(v, n) for v in (0, 1) for n in NORMS]
  return [(v, n, m) for v in (0, 1) for n in NORMS for m in CNN_METHODS[v]]


def ball_samples(x, radius, norm, count, rng):
  """``count`` points of the ball of ``radius`` around one example ``x``: uniform
  inside, on the sphere (l_2) and at random corners (l_inf)."""
  shape = (count,) + x.shape
  if norm == np.inf:
    inside = rng.uniform(-1.0, 1.0, size=shape)
    corners = rng.choice([-1.0, 1.0], size=shape)
    delta = np.concatenate([inside, corners])
  else:
    direction = rng.normal(size=(2 * count, x.size))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    scale = rng.uniform(size=(2 * count, 1)) ** (1.0 / x.size)
    scale[count:] = 1.0  # on the sphere
    delta = (direction * scale).reshape((2 * count,) + x.shape)
  return (x + radius * delta).astype("float32")


def assert_contains(lower, upper, values):
  """lower <= values <= upper up to float32 rounding of the sampled logits."""
  slack = 1e-4 * (1.0 + np.abs(values))
  assert np.all(values >= lower - slack), (values - lower).min()
  assert np.all(values <= upper + slack), (upper - values).min()


def margin_logits(logits, label):
  """z_y - z_j for every j: [n, classes]."""
  return logits[:, label : label + 1] - logits


# ---------------------------------------------------------------------------
# Exactness on affine models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("norm", NORMS)
def test_affine_radius_is_the_exact_distance(norm, method):
  """flatten(x) W + b: the l_2 ball passes the flatten as a ball."""
  model, w, b = affine_model((2, 3))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 2, 3)).astype("float32")
  labels = np.argmax(model(x), axis=1)
  exact = exact_distance(w, b, x, labels, norm)
  max_radius, steps = 2.0 * exact.max(), 20
  radius = certified.certified_radius(
      model, x, labels, norm=norm, method=method, max_radius=max_radius, steps=steps
  )
  tolerance = max_radius / 2**steps + 1e-9
  assert np.all(radius <= exact + 1e-9)
  np.testing.assert_allclose(radius, exact, atol=tolerance)
  # Misclassified examples get 0.
  wrong = (labels + 1) % CLASSES
  assert np.all(
      certified.certified_radius(model, x, wrong, norm=norm, method=method) == 0.0
  )


@pytest.mark.parametrize("norm", NORMS)
def test_affine_margin_bounds_are_exact(norm):
  """The difference rows make the bound on z_y - z_j that of one affine map:
  z_y - z_j -+ eps ||W_y - W_j||_q exactly (IBP and CROWN)."""
  model, w, b = affine_model()
  x = np.random.default_rng(2).normal(size=(6, DIM)).astype("float32")
  labels = np.array([0, 1, 2, 3, 0, 1])
  epsilon = np.linspace(0.0, 0.5, 6)
  z = x.astype(np.float64) @ w + b
  for i, y in enumerate(labels):
    gap = z[i, y] - z[i]
    norms = np.linalg.norm(w[:, [y]] - w, DUAL[norm], axis=0)
    for bounds in (certified.interval_bounds, certified.crown_bounds):
      lower, upper = bounds(model, x, epsilon, norm=norm, labels=labels)
      np.testing.assert_allclose(lower[i], gap - epsilon[i] * norms, atol=1e-6)
      np.testing.assert_allclose(upper[i], gap + epsilon[i] * norms, atol=1e-6)


def test_bisection_finds_the_threshold_radius():
  """With the predicate r <= t: t to max_radius / 2^steps below, max_radius where
  t >= max_radius, 0 for the examples left out (misclassified)."""
  thresholds = np.array([0.3, 0.0, 0.7, 2.0, 0.5])
  rows = np.array([0, 1, 2, 3])

  def below_threshold(radii, rows):
    return radii <= thresholds[rows]

  radius = certified.bisect_radius(below_threshold, rows, 5, 1.0, 10)
  assert np.all(radius[:3] <= thresholds[:3])
  np.testing.assert_allclose(radius[:3], thresholds[:3], atol=2.0**-10)
  assert radius[3] == 1.0 and radius[4] == 0.0


def test_clip_box_bounds_the_input():
  """l_inf: inside a box of half-width s around x, any eps >= s gives the bounds of
  eps = s; l_2: the box only tightens the bounds."""
  model, x, labels = random_cnn(0)
  half_width = 0.05
  x64 = x.astype(np.float64)
  box = dict(clip_min=x64 - half_width, clip_max=x64 + half_width)
  reference = certified.interval_bounds(model, x, half_width)
  for epsilon in (half_width, 0.2, 1.0):
    clipped = certified.interval_bounds(model, x, epsilon, **box)
    np.testing.assert_allclose(clipped, reference, rtol=1e-12, atol=1e-12)
  free = certified.crown_bounds(model, x, 0.3, norm=2, labels=labels)
  clipped = certified.crown_bounds(model, x, 0.3, norm=2, labels=labels, **box)
  assert np.all(clipped[0] >= free[0]) and np.all(clipped[1] <= free[1])
  assert np.all(
      certified.certified_radius(model, x, labels, norm=2, steps=8, **box)
      >= certified.certified_radius(model, x, labels, norm=2, steps=8)
  )


# ---------------------------------------------------------------------------
# Soundness on random ReLU CNNs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [0, 1])
def test_parsed_network_reproduces_the_logits(variant):
  model, x, _ = random_cnn(variant)
  logits = model(x).numpy()
  for bounds in (certified.interval_bounds, certified.crown_bounds):
    lower, upper = bounds(model, x, 0.0)
    np.testing.assert_allclose(lower, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lower, upper, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant, norm, method", cnn_cases("method"))
def test_certified_ball_keeps_the_prediction(variant, norm, method):
  model, x, labels = random_cnn(variant)
  radius = cnn_radii(variant, norm, method)
  assert np.all(radius > 0.0)
  rng = np.random.default_rng(3)
  for i in range(len(x)):
    points = ball_samples(x[i], radius[i], norm, SAMPLES, rng)
    # And PGD, which searches the ball for a flip.
    attack = attacks.pgd(
        model,
        x[i : i + 1],
        labels[i : i + 1],
        radius[i],
        norm=norm,
        steps=10,
        clip_min=-np.inf,
        clip_max=np.inf,
    )
    points = np.concatenate([points, attack.numpy()])
    predictions = np.argmax(model(points), axis=1)
    assert np.all(predictions == labels[i]), (i, radius[i])


@pytest.mark.parametrize("variant, norm", cnn_cases())
def test_bounds_contain_sampled_logits_and_crown_is_tighter(variant, norm):
  model, x, labels = random_cnn(variant)
  epsilon = cnn_radii(variant, norm, "ibp") * 3.0  # where the prediction may flip
  ibp = certified.interval_bounds(model, x, epsilon, norm=norm)
  ibp_margin = certified.interval_bounds(model, x, epsilon, norm=norm, labels=labels)
  crown = certified.crown_bounds(model, x, epsilon, norm=norm)
  crown_margin = certified.crown_bounds(model, x, epsilon, norm=norm, labels=labels)
  for tight, loose in ((crown, ibp), (crown_margin, ibp_margin)):
    assert np.all(tight[0] >= loose[0]) and np.all(tight[1] <= loose[1])
  # CROWN is strictly tighter somewhere: its relaxation is not just IBP.
  assert np.any(crown_margin[0] > ibp_margin[0] + 1e-6)
  rng = np.random.default_rng(4)
  for i in range(len(x)):
    logits = model(ball_samples(x[i], epsilon[i], norm, SAMPLES, rng)).numpy()
    for lower, upper in (ibp, crown):
      assert_contains(lower[i], upper[i], logits)
    for lower, upper in (ibp_margin, crown_margin):
      assert_contains(lower[i], upper[i], margin_logits(logits, labels[i]))


@pytest.mark.parametrize("variant, norm", cnn_cases())
def test_crown_radius_is_at_least_the_ibp_radius(variant, norm):
  ibp = cnn_radii(variant, norm, "ibp")
  for method in CNN_METHODS[variant][1:]:
    crown = cnn_radii(variant, norm, method)
    assert np.all(crown >= ibp)
    assert np.all(crown > ibp)  # and strictly larger on these networks


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("network", ["cnn", "mlp"])
def test_radius_is_below_deepfool_and_positive_when_confident(network, norm):
  """DeepFool's perturbation flips the prediction: its length bounds the margin
  from above, the certified radius from below."""
  if network == "cnn":
    model, x, labels = random_cnn(0)
    radii = {method: cnn_radii(0, norm, method) for method in METHODS}
  else:
    model, x, labels = random_mlp()
    radii = {
        method: certified.certified_radius(
            model, x, labels, norm=norm, method=method, max_radius=1.0, steps=12
        )
        for method in ("ibp", "crown")
    }
  _, deepfool = margin_estimation.deepfool(model, x, labels, norm=norm)
  assert np.isfinite(deepfool).mean() >= 0.5  # inf: not flipped, no upper bound
  logits = np.sort(model(x).numpy(), axis=1)
  confident = logits[:, -1] - logits[:, -2] > 1e-2
  assert confident.any()
  for method, radius in radii.items():
    assert np.all(radius <= deepfool), (method, radius, deepfool)
    assert np.all(radius[confident] > 0.0), method


def test_mnist_cnn():
  """The paper's network (BatchNormalizationTF1 with moving statistics)."""
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(5)
  model = architectures.mnist_cnn()
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      randomize_batch_norm(layer, rng)
  x = rng.uniform(size=(2, 28, 28, 1)).astype("float32")
  logits = model(x).numpy()
  labels = np.argmax(logits, axis=1)
  lower, upper = certified.interval_bounds(model, x, 0.0)
  np.testing.assert_allclose(lower, logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(lower, upper)
  epsilon = 1e-6
  ibp = certified.margin_lower_bound(model, x, labels, epsilon)
  crown = certified.margin_lower_bound(model, x, labels, epsilon, method="crown-ibp")
  assert np.all(crown >= ibp) and np.all(crown > 0.0)
  for i in range(len(x)):
    sampled = model(ball_samples(x[i], epsilon, np.inf, 64, rng)).numpy()
    worst = np.min(np.delete(margin_logits(sampled, labels[i]), labels[i], 1), 1)
    assert np.all(worst >= crown[i] - 1e-5)


def test_nested_models_and_identity_layers():
  """A Sequential inside a functional model, with reshapes and the identity layers
  (Dropout at inference, a linear Activation)."""
  model, x, _ = random_cnn(0)
  inner = keras.Sequential(
      [
          keras.Input((8, 8, 2)),
          keras.layers.Dropout(0.5),
          keras.layers.Reshape((128,)),
          keras.layers.Activation("linear"),
          keras.layers.Reshape((8, 8, 2)),
          model,
      ]
  )
  inputs = keras.Input((8, 8, 2))
  outer = keras.Model(inputs, inner(inputs))
  np.testing.assert_allclose(
      certified.interval_bounds(outer, x, 0.01),
      certified.interval_bounds(model, x, 0.01),
      rtol=1e-12,
  )


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


UNSUPPORTED = {
    "layer_norm": (
        lambda: [keras.layers.LayerNormalization(name="ln")],
        "'ln' \\(LayerNormalization\\)",
    ),
    "tanh": (lambda: [keras.layers.Dense(4, activation="tanh", name="d")], "'d'.*tanh"),
    "relu6": (lambda: [keras.layers.ReLU(max_value=6.0, name="r6")], "'r6'.*max_value"),
    "softmax": (lambda: [keras.layers.Activation("softmax", name="s")], "'s'.*softmax"),
    "conv1d": (
        lambda: [keras.layers.Conv1D(2, 1, name="c1"), keras.layers.Flatten()],
        "'c1' \\(Conv1D\\)",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_layers(case):
  """The error names the layer and its type."""
  layers, message = UNSUPPORTED[case]
  model = keras.Sequential(
      [keras.Input((DIM, 1)), *layers(), keras.layers.Flatten(), keras.layers.Dense(3)]
  )
  x = np.zeros((2, DIM, 1), "float32")
  with pytest.raises(ValueError, match=message):
    certified.interval_bounds(model, x, 0.1)


def test_graph_errors():
  inputs = keras.Input((DIM,))
  h = keras.layers.Dense(4)(inputs)
  branch = keras.layers.Add(name="add")([h, keras.layers.Dense(4)(inputs)])
  x = np.zeros((2, DIM), "float32")
  with pytest.raises(ValueError, match="'add' \\(Add\\) has 2 inputs"):
    certified.interval_bounds(
        keras.Model(inputs, keras.layers.Dense(3)(branch)), x, 0.1
    )
  h = keras.layers.BatchNormalization(name="bn")(h, training=True)
  with pytest.raises(ValueError, match="'bn'.*training=True"):
    certified.interval_bounds(keras.Model(inputs, keras.layers.Dense(3)(h)), x, 0.1)

  class Subclassed(keras.Model):

    def __init__(self):
      super().__init__()
      self.dense = keras.layers.Dense(3)

    def call(self, x):
      return self.dense(x)

  with pytest.raises(ValueError, match="subclassed"):
    certified.interval_bounds(Subclassed(), x, 0.1)


def test_modified_layer_subclass_is_detected():
  class Doubled(keras.layers.Dense):

    def call(self, inputs):
      return 2.0 * super().call(inputs)

  model = keras.Sequential([keras.Input((DIM,)), Doubled(3)])
  with pytest.raises(ValueError, match="do not reproduce"):
    certified.interval_bounds(model, np.ones((2, DIM), "float32"), 0.1)


def test_argument_errors():
  model, _, _ = affine_model()
  x = np.random.default_rng(6).normal(size=(3, DIM)).astype("float32")
  labels = np.array([0, 1, 2])
  with pytest.raises(ValueError, match="inference-mode"):
    certified.interval_bounds(model, x, 0.1, training=True)
  with pytest.raises(ValueError, match="inference-mode"):
    certified.certified_radius(model, x, labels, training=True)
  for norm in (1, 3, "inf", True):
    with pytest.raises(ValueError, match="norm must be 2 or np.inf"):
      certified.certified_radius(model, x, labels, norm=norm)
  with pytest.raises(ValueError, match="method"):
    certified.certified_radius(model, x, labels, method="lp")
  with pytest.raises(ValueError, match="intermediate"):
    certified.crown_bounds(model, x, 0.1, intermediate="lp")
  for epsilon in (-0.1, np.nan, [0.1, 0.2]):
    with pytest.raises(ValueError, match="epsilon"):
      certified.interval_bounds(model, x, epsilon)
  with pytest.raises(ValueError, match="max_radius"):
    certified.certified_radius(model, x, labels, max_radius=0.0)
  with pytest.raises(ValueError, match="steps"):
    certified.certified_radius(model, x, labels, steps=0)
  with pytest.raises(ValueError, match="clip_min must be < clip_max"):
    certified.interval_bounds(model, x, 0.1, clip_min=1.0, clip_max=-1.0)
  with pytest.raises(ValueError, match="x must lie in the box"):
    certified.interval_bounds(model, x, 0.1, clip_min=0.0)
  with pytest.raises(ValueError, match="labels"):
    certified.certified_radius(model, x, np.array([0, 1, 7]))
