"""Randomised property tests (hypothesis): finite outputs and gradients everywhere.

For every public loss (`LargeMarginLoss` and its options, the `large_margin` function
family, the output-margin losses), the model steps (`MarginModel`, `JacobianModel`
via ``train_on_batch``), the margin estimators, the attacks and the certified radius,
over the dtypes float16 / bfloat16 / float32 / float64 and degenerate inputs
(all-equal logits, zero inputs and dead ReLUs, a single example, a single class in the
batch, gamma = 1e30, a saturated softmax (logits +-1e4), huge and tiny scales):

    the outputs are finite and the gradients (w.r.t. the logits or the weights) are
    finite, or a ValueError is raised before any computation.

dtypes: the losses take logits (or cosines) of that dtype; the models are built under
the matching Keras dtype policy (mixed_float16, mixed_bfloat16, float32, float64).

Profiles (registered here, not in conftest.py): "ci" (default; few examples per test,
derandomised so that CI is reproducible) and "thorough" (many random examples), chosen
with the environment variable HYPOTHESIS_PROFILE:

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py

The health check ``too_slow`` is suppressed: each example runs TensorFlow ops (and
the model tests trace a Keras train function), which hypothesis would count as slow
data generation. Known, unfixed defects are strict xfails below (each names the
input and the symptom); the random tests keep out of exactly those regions, with a
comment pointing at the xfail.
"""

import contextlib
import os

import hypothesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import attacks
from tf_large_margin import certified
from tf_large_margin import margin_loss
from tf_large_margin import margin_estimation
from tf_large_margin import output_margin

# ---------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------

PROFILE_VARIABLE = "HYPOTHESIS_PROFILE"
hypothesis.settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "thorough",
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get(PROFILE_VARIABLE, "ci")
# Examples per test relative to the profile's max_examples (cheap tests run more).
_THOROUGH_FACTOR = 10


def budget(ci_examples):
  """Settings of the active profile with ``ci_examples`` examples under "ci" (and
  ten times as many under "thorough")."""
  parent = hypothesis.settings.get_profile(PROFILE)
  factor = _THOROUGH_FACTOR if PROFILE == "thorough" else 1
  return hypothesis.settings(parent, max_examples=ci_examples * factor)


# ---------------------------------------------------------------------------
# Shared helpers and strategies
# ---------------------------------------------------------------------------

DTYPES = ("float16", "bfloat16", "float32", "float64")
# The Keras dtype policy a model of that dtype is built under.
POLICIES = {
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "float32": "float32",
    "float64": "float64",
}
# Largest logit magnitude generated per dtype: float16 (max 65504) holds the
# saturated +-1e4 logits but not 1e30.
MAX_LOGIT_EXPONENT = {"float16": 4, "bfloat16": 30, "float32": 30, "float64": 30}
SATURATED = 1e4
IN_DIM, HIDDEN = 3, 4


def to_numpy(value):
  """A tensor (any float dtype, bfloat16 included) or array as a float64 array."""
  if isinstance(value, dict):
    return {k: to_numpy(v) for k, v in value.items()}
  if tf.is_tensor(value) or isinstance(value, tf.Variable):
    return tf.cast(value, tf.float64).numpy()
  return np.asarray(value, np.float64)


def assert_finite(name, value):
  values = to_numpy(value)
  assert np.all(np.isfinite(values)), f"{name} is not finite: {values}"


def assert_gradients_finite(name, gradients):
  for i, gradient in enumerate(gradients):
    assert gradient is not None, f"{name}[{i}] has no gradient"
    assert_finite(f"{name}[{i}]", gradient)


@contextlib.contextmanager
def dtype_policy(name):
  previous = keras.mixed_precision.dtype_policy()
  keras.mixed_precision.set_dtype_policy(name)
  try:
    yield
  finally:
    keras.mixed_precision.set_dtype_policy(previous)


def labels_strategy(batch, classes):
  """Random labels, or one class for the whole batch."""
  return st.one_of(
      st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch),
      st.integers(0, classes - 1).map(lambda c: [c] * batch),
  ).map(lambda labels: np.array(labels, np.int32))


@st.composite
def logits_case(draw, dtype, max_classes=5):
  """``(logits [float64 array, representable in dtype], labels)``."""
  batch = draw(st.integers(1, 8))
  classes = draw(st.integers(2, max_classes))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  kind = draw(
      st.sampled_from(["random", "all_equal", "zero", "saturated", "scaled", "one_hot"])
  )
  top = MAX_LOGIT_EXPONENT[dtype]
  shape = (batch, classes)
  if kind == "random":
    logits = 3.0 * rng.normal(size=shape)
  elif kind == "all_equal":
    logits = np.full(shape, draw(st.sampled_from([0.0, 1.0, -7.5, 10.0**top])))
  elif kind == "zero":
    logits = np.zeros(shape)
  elif kind == "saturated":
    logits = np.where(rng.random(shape) < 0.5, SATURATED, -SATURATED)
  elif kind == "scaled":
    logits = rng.normal(size=shape) * 10.0 ** draw(st.integers(-30, top - 1))
  else:  # one_hot: one huge logit per row, maybe the label's
    logits = np.zeros(shape)
    logits[np.arange(batch), rng.integers(0, classes, batch)] = 10.0**top
  labels = draw(labels_strategy(batch, classes))
  return logits, labels


@st.composite
def margin_options(draw, classes):
  """Keyword arguments shared by `large_margin` and `LargeMarginLoss`."""
  return dict(
      gamma=draw(st.sampled_from([1.0, 10000.0, 1e30])),
      alpha_factor=draw(st.sampled_from([0.5, 2.0, 4.0])),
      top_k=draw(st.integers(1, classes)),
      dist_norm=draw(st.sampled_from([1, 2, np.inf])),
      epsilon=draw(st.sampled_from([1e-8, 1e-6, 1e-2])),
      use_approximation=draw(st.booleans()),
      worst_case_loss=draw(st.booleans()),
  )


# ---------------------------------------------------------------------------
# LargeMarginLoss and the large_margin family on logits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@budget(20)
@hypothesis.given(data=st.data())
def test_large_margin_loss_is_finite(dtype, data):
  logits, labels = data.draw(logits_case(dtype))
  classes = logits.shape[1]
  options = data.draw(margin_options(classes))
  options.update(
      cross_entropy_weight=data.draw(st.sampled_from([0.0, 1.0])),
      from_logits=data.draw(st.booleans()),
      shrinkage=data.draw(st.sampled_from(["clip", "identity"])),
      aggregation=data.draw(st.sampled_from(["mean", "min", 2])),
      correct_only=data.draw(st.booleans()),
      reduction=data.draw(st.sampled_from([None, "sum", "sum_over_batch_size"])),
  )
  # The loss computes in its own dtype (Keras casts y_pred to it): the default
  # (float32) for every logits dtype, and float64 for float64 logits too.
  if dtype == "float64" and data.draw(st.booleans()):
    options["dtype"] = "float64"
  loss = tlm.LargeMarginLoss(**options)
  y_pred = tf.constant(logits, dtype)
  if not options["from_logits"]:
    y_pred = tf.cast(tf.nn.softmax(tf.constant(logits, tf.float64)), dtype)
  y_true = labels if data.draw(st.booleans()) else np.eye(classes)[labels]
  assert_finite("loss", loss(y_true, y_pred))
  # Keras casts y_pred to the loss dtype and computes there: the gradient is taken
  # w.r.t. that tensor. (Cast back to float16 it may overflow: d log p / d p = 1 / p
  # is 1e7 for from_logits=False, and see
  # test_float16_margin_gradient_overflows_without_the_approximation.)
  y_in = tf.cast(y_pred, loss.dtype)
  with tf.GradientTape() as tape:
    tape.watch(y_in)
    value = loss(y_true, y_in)
  assert_finite("loss", value)
  assert_gradients_finite("d loss / d y_pred", [tape.gradient(value, y_in)])


@pytest.mark.parametrize("dtype", DTYPES)
@budget(20)
@hypothesis.given(data=st.data())
def test_margin_functions_on_logits_are_finite(dtype, data):
  """`logit_margin_per_example` and `large_margin` at the logits, in the logits'
  own dtype (the margin math runs in float32 for half precision)."""
  logits, labels = data.draw(logits_case(dtype))
  classes = logits.shape[1]
  options = data.draw(margin_options(classes))
  if dtype == "float16":
    # Known (test_float16_margin_gradient_overflows_without_the_approximation).
    options["use_approximation"] = True
  z = tf.constant(logits, dtype)
  one_hot = tf.one_hot(labels, classes, dtype=dtype)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(z)
    per_example = margin_loss.logit_margin_per_example(
        logits=z,
        one_hot_labels=one_hot,
        shrinkage=data.draw(st.sampled_from(["clip", "identity"])),
        **options,
    )
    with tf.GradientTape(persistent=True) as inner:
      inner.watch(z)
      logits_again = tf.identity(z)
    value = tlm.large_margin(
        logits=logits_again,
        one_hot_labels=one_hot,
        layers_list=[logits_again],
        tape=inner,
        **options,
    )
  assert_finite("logit_margin_per_example", per_example)
  assert_finite("large_margin", value)
  assert_gradients_finite(
      "gradients",
      [tape.gradient(per_example, z), tape.gradient(value, z)],
  )


@st.composite
def network_case(draw, dtype, max_classes=5):
  """A two-layer ReLU network's float64 weights and a batch:
  ``(x, labels, (w1, b1, w2, b2))``, with degenerate weights and inputs."""
  batch = draw(st.integers(1, 8))
  classes = draw(st.integers(2, max_classes))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  w1, b1 = rng.normal(size=(IN_DIM, HIDDEN)), 0.1 * rng.normal(size=HIDDEN)
  w2, b2 = rng.normal(size=(HIDDEN, classes)), 0.1 * rng.normal(size=classes)
  weights = draw(st.sampled_from(["normal", "saturating", "all_equal_logits", "dead"]))
  if weights == "saturating":  # logit gaps of about 1e3-1e4: p is one-hot
    w2 *= 1e3
  elif weights == "all_equal_logits":
    w2, b2 = np.zeros_like(w2), np.zeros_like(b2)
  elif weights == "dead":  # every ReLU off for inputs in [0, 1): zero activations
    w1, b1 = -np.abs(w1), -np.ones(HIDDEN)
  inputs = draw(st.sampled_from(["random", "zero", "scaled"]))
  x = rng.random((batch, IN_DIM))
  if inputs == "zero":
    x = np.zeros_like(x)
  elif inputs == "scaled":
    top = 2 if dtype == "float16" else 30
    x = x * 10.0 ** draw(st.integers(-30, top))
  labels = draw(labels_strategy(batch, classes))
  return x, labels, (w1, b1, w2, b2)


def forward(x, w1, b1, w2, b2):
  hidden = tf.nn.relu(x @ w1 + b1)
  return hidden, hidden @ w2 + b2


def vanishing_gradient(x, params, names):
  """True if, for some example, the logits' gradient w.r.t. one of the layers
  ``names`` below the logits ("x" / "input", "h") vanishes: dead ReLUs or a zero
  logits kernel."""
  w1, b1, w2, _ = params
  if {"x", "input", "h"} & set(names) and not np.any(w2):
    return True
  if not {"x", "input"} & set(names):
    return False
  active = (x @ w1 + b1 > 0).astype(np.float64)  # [batch, hidden]
  jacobians = np.einsum("ih,bh,hc->bic", w1, active, w2)
  return bool(np.any(np.all(jacobians == 0, axis=(1, 2))))


@pytest.mark.xfail(
    strict=True,
    reason="Finding (not fixed: inherent to float16): with use_approximation=False "
    "the gradient runs through the denominator, d loss / d logits ~ (p_y - p_j) "
    "||d c / d z|| / (||c|| + epsilon)^2 with c = d (p_y - p_j) / d z; near "
    "saturation (logit gap 14, ||c|| ~ 1e-6) it is 4e5 in float32 and overflows "
    "float16 logits (inf), with gamma large enough that d is not clipped.",
)
def test_float16_margin_gradient_overflows_without_the_approximation():
  z = tf.constant([[0.0, 14.0]], tf.float16)
  with tf.GradientTape() as tape:
    tape.watch(z)
    value = margin_loss.logit_margin_per_example(
        logits=z,
        one_hot_labels=tf.one_hot([0], 2, dtype=tf.float16),
        gamma=1e30,
        use_approximation=False,
    )
  assert_finite("loss", value)
  assert_gradients_finite("d loss / d logits", [tape.gradient(value, z)])


def test_use_approximation_false_at_a_saturated_softmax():
  """Regression: with use_approximation=False and dist_norm=2 the gradient of the
  norm in the denominator was tf.norm's 0 / 0 = NaN at a saturated softmax (the
  cotangent d (p_y - p_j) / d logits is exactly 0); `flat_norm` now has the
  subgradient 0 there."""
  for dtype in DTYPES:
    z = tf.constant([[-SATURATED, SATURATED], [SATURATED, -SATURATED]], dtype)
    loss = tlm.LargeMarginLoss(gamma=1e30, use_approximation=False, dist_norm=2)
    y_in = tf.cast(z, loss.dtype)
    with tf.GradientTape() as tape:
      tape.watch(y_in)
      value = loss([0, 0], y_in)
    assert_finite("loss", value)
    assert_gradients_finite("d loss / d logits", [tape.gradient(value, y_in)])
  x = tf.zeros([3, 2])
  with tf.GradientTape() as tape:
    tape.watch(x)
    norms = margin_loss.flat_norm(x, 2)
  np.testing.assert_array_equal(tape.gradient(norms, x), np.zeros([3, 2]))


@pytest.mark.parametrize("dtype", DTYPES)
@budget(10)
@hypothesis.given(data=st.data())
def test_large_margin_at_hidden_layers_is_finite(dtype, data):
  """`large_margin` / `large_margin_per_example` / `margin_distances` at the input,
  a hidden layer and the logits of a network computed in ``dtype``; gradients
  w.r.t. the weights through an outer tape."""
  x, labels, params = data.draw(network_case(dtype))
  classes = params[2].shape[1]
  names = data.draw(
      st.lists(
          st.sampled_from(["x", "h", "logits"]), min_size=1, max_size=3, unique=True
      )
  )
  options = data.draw(margin_options(classes))
  if dtype == "float16":
    # Known (test_float16_margin_gradient_overflows_at_a_dead_input_layer): an
    # example whose gradient at a margin layer vanishes gets d loss / d logits of
    # about (d p / d logits) / epsilon, beyond float16's range; and
    # (test_float16_margin_gradient_overflows_without_the_approximation) the
    # second-order terms of use_approximation=False, up to 1 / ||grad||^2.
    hypothesis.assume(not vanishing_gradient(x, params, names))
    options["use_approximation"] = True
  weights = [tf.Variable(tf.constant(p, dtype)) for p in params]
  x = tf.constant(x, dtype)
  with tf.GradientTape() as outer:
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      hidden, logits = forward(x, *weights)
    hypothesis.assume(np.all(np.isfinite(to_numpy(logits))))  # in the dtype's range
    layers = dict(x=x, h=hidden, logits=logits)
    kwargs = dict(
        logits=logits,
        one_hot_labels=tf.one_hot(labels, classes),
        layers_list=[layers[name] for name in names],
        layers_weights=data.draw(
            st.one_of(st.none(), st.just([2.0 ** i for i in range(len(names))]))
        ),
        tape=tape,
        **options,
    )
    value = tlm.large_margin(**kwargs)
    per_example = tlm.large_margin_per_example(**kwargs)
    kwargs.pop("gamma"), kwargs.pop("alpha_factor"), kwargs.pop("worst_case_loss")
    differences, distances = tlm.margin_distances(**kwargs)
  assert_finite("large_margin", value)
  assert_finite("large_margin_per_example", per_example)
  assert_finite("differences", differences)
  for name, d in zip(names, distances):
    assert_finite(f"distances at {name}", d)
  assert_gradients_finite("d large_margin / d weights", outer.gradient(value, weights))


def _dead_relu_float16_case():
  x = tf.constant([[0.5, 0.25, 1.0]], tf.float16)
  w1 = tf.Variable(-tf.ones([IN_DIM, HIDDEN], tf.float16))  # every ReLU off
  w2 = tf.Variable(tf.constant([[1.0, -1.0, 0.5]] * HIDDEN, tf.float16))
  b2 = tf.Variable(tf.constant([0.0, 0.5, -0.5], tf.float16))
  with tf.GradientTape() as outer:
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      logits = tf.nn.relu(x @ w1) @ w2 + b2
    value = tlm.large_margin(
        logits=logits,
        one_hot_labels=tf.one_hot([0], 3),
        layers_list=[x],
        gamma=1e30,
        tape=tape,
    )
  return value, outer.gradient(value, [w2, b2])


@pytest.mark.xfail(
    strict=True,
    reason="Finding (not fixed: inherent to float16 with epsilon = 1e-8): an example "
    "whose gradient at a margin layer vanishes (dead ReLUs below the input layer) has "
    "d = (p_y - p_j) / epsilon, so d loss / d logits = (d p / d logits) / epsilon, "
    "about 1e7: it overflows float16 when cast back to the float16 logits, and the "
    "weight gradients are inf/NaN (float32 and bfloat16 logits are finite).",
)
def test_float16_margin_gradient_overflows_at_a_dead_input_layer():
  value, gradients = _dead_relu_float16_case()
  assert_finite("large_margin", value)
  assert_gradients_finite("d large_margin / d weights", gradients)


@pytest.mark.parametrize("dtype", DTYPES)
@budget(10)
@hypothesis.given(data=st.data(), epsilon=st.sampled_from([0.0, -1e-8, -1.0]))
def test_margin_loss_rejects_epsilon_zero_but_estimates_allow_it(dtype, data, epsilon):
  """Regression: epsilon = 0 gave NaN losses and gradients wherever the gradient of
  p_y - p_j vanishes (saturated softmax, dead ReLUs); the losses now raise
  ValueError for epsilon <= 0, and `margin_distances` with epsilon = 0 gives +-inf
  there and 0 (not 0 / 0 = NaN) on the boundary p_y = p_j."""
  logits, labels = data.draw(logits_case(dtype))
  classes = logits.shape[1]
  z = tf.constant(logits, dtype)
  one_hot = tf.one_hot(labels, classes)
  with pytest.raises(ValueError, match="epsilon"):
    tlm.LargeMarginLoss(epsilon=epsilon)(labels, z)
  with pytest.raises(ValueError, match="epsilon"):
    margin_loss.logit_margin_per_example(logits=z, one_hot_labels=one_hot, epsilon=epsilon)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(z)
    logits_again = tf.identity(z)
  with pytest.raises(ValueError, match="epsilon"):
    tlm.large_margin(
        logits=logits_again,
        one_hot_labels=one_hot,
        layers_list=[logits_again],
        epsilon=epsilon,
        tape=tape,
    )
  kwargs = dict(
      logits=logits_again,
      one_hot_labels=one_hot,
      layers_list=[logits_again],
      top_k=data.draw(st.integers(1, classes)),
      tape=tape,
  )
  if epsilon < 0:
    with pytest.raises(ValueError, match="epsilon"):
      tlm.margin_distances(epsilon=epsilon, **kwargs)
    return
  differences, (distances,) = tlm.margin_distances(epsilon=0.0, **kwargs)
  distances, differences = to_numpy(distances), to_numpy(differences)
  assert not np.any(np.isnan(distances)), distances
  # +-inf only where the gradient vanishes, with the sign of p_y - p_j.
  infinite = np.isinf(distances)
  assert np.all(np.sign(distances[infinite]) == np.sign(differences[infinite]))


def test_first_order_margins_epsilon_zero_on_zero_inputs_is_not_nan():
  """Regression: zero inputs through a ReLU network (no biases) tie the logits and
  zero the input gradient; epsilon = 0 gave 0 / 0 = NaN at the input layer."""
  model = keras.Sequential(
      [
          keras.Input((IN_DIM,)),
          keras.layers.Dense(HIDDEN, activation="relu", use_bias=False, name="h"),
          keras.layers.Dense(3, use_bias=False, name="logits"),
      ]
  )
  found, _ = margin_estimation.first_order_margins(
      model, np.zeros((2, IN_DIM), "float32"), [0, 2], ["input", "h"], epsilon=0.0
  )
  np.testing.assert_array_equal(found["input"], [0.0, 0.0])
  np.testing.assert_array_equal(found["h"], [0.0, 0.0])


def test_aggregation_with_float64_logits():
  """Regression: aggregation "min" / n with float64 logits raised
  InvalidArgumentError (a float32 -inf filler in a float64 tf.where)."""
  logits = tf.constant([[2.0, 0.0, 1.0], [0.0, 1.0, 0.5], [3.0, -1.0, 0.0]], tf.float64)
  labels = np.array([0, 0, 0])
  for aggregation in ("min", 2):
    for correct_only in (False, True):
      loss = tlm.LargeMarginLoss(
          gamma=1.0,
          aggregation=aggregation,
          correct_only=correct_only,
          dtype="float64",
      )
      value = loss(labels, logits)
      assert value.dtype == tf.float64
      assert np.isfinite(value.numpy())


# ---------------------------------------------------------------------------
# Output-margin losses (hinge, AM-Softmax / CosFace, ArcFace, L-Softmax, SphereFace)
# ---------------------------------------------------------------------------


@st.composite
def cosine_case(draw, dtype):
  """``(cos [batch, classes] in [-1, 1], scale [batch, classes] >= 0, labels)``:
  what `CosineHead` returns (the scale is ||x|| or ||w_j|| ||x||)."""
  batch = draw(st.integers(1, 8))
  classes = draw(st.integers(2, 5))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  shape = (batch, classes)
  kind = draw(
      st.sampled_from(["random", "all_equal", "zero", "plus_minus_one", "one_hot"])
  )
  if kind == "random":
    cos = rng.uniform(-1.0, 1.0, shape)
  elif kind == "all_equal":
    cos = np.full(shape, draw(st.sampled_from([-1.0, -0.5, 0.3, 1.0])))
  elif kind == "zero":
    cos = np.zeros(shape)
  elif kind == "plus_minus_one":
    cos = np.where(rng.random(shape) < 0.5, 1.0, -1.0)
  else:
    cos = -np.ones(shape)
    cos[np.arange(batch), rng.integers(0, classes, batch)] = 1.0
  # float16: scale * psi (>= 1 - 2m = -7) must stay below 65504.
  top = 3 if dtype == "float16" else 30
  scale_kind = draw(st.sampled_from(["one", "zero", "random", "scaled"]))
  if scale_kind == "one":
    scale = np.ones(shape)
  elif scale_kind == "zero":  # zero features: ||x|| = 0
    scale = np.zeros(shape)
  elif scale_kind == "random":
    scale = rng.uniform(0.0, 10.0, shape)
  else:
    scale = np.broadcast_to(
        10.0 ** draw(st.integers(-30, top)) * rng.uniform(0.5, 1.0, (batch, 1)), shape
    )
  labels = draw(labels_strategy(batch, classes))
  return cos, np.array(scale), labels


OUTPUT_LOSSES = {
    "hinge": (output_margin.multiclass_hinge, tlm.MulticlassHinge),
    "am_softmax": (output_margin.am_softmax, tlm.AMSoftmax),
    "arcface": (output_margin.arcface, tlm.ArcFace),
    "l_softmax": (output_margin.l_softmax, tlm.LSoftmax),
    "sphereface": (output_margin.sphereface, tlm.SphereFace),
}


@st.composite
def output_loss_case(draw, dtype):
  """``(name, options, y_pred [float64 array], labels)``."""
  name = draw(st.sampled_from(sorted(OUTPUT_LOSSES)))
  if name == "hinge":
    scores, labels = draw(logits_case(dtype))
    options = dict(
        variant=draw(st.sampled_from(["crammer_singer", "weston_watkins"])),
        margin=draw(st.sampled_from([0.0, 1.0, 1e4, 1e30])),
    )
    return name, options, scores, labels
  cos, scale, labels = draw(cosine_case(dtype))
  if name in ("am_softmax", "arcface"):
    options = dict(
        margin=draw(st.sampled_from([0.0, 0.35, 1.0, 3.0])),
        # float16: the gradient w.r.t. cos is about the scale, so at most 1e4.
        scale=draw(
            st.sampled_from([1.0, 30.0, 64.0, 10.0 ** MAX_LOGIT_EXPONENT[dtype]])
        ),
    )
    return name, options, cos, labels
  options = dict(
      m=draw(st.integers(1, 4)), lambda_=draw(st.sampled_from([0.0, 5.0, 1e30]))
  )
  return name, options, np.concatenate([cos, scale], axis=1), labels


@pytest.mark.parametrize("dtype", DTYPES)
@budget(20)
@hypothesis.given(data=st.data())
def test_output_margines_are_finite(dtype, data):
  """The plain functions on y_pred of ``dtype`` and the Keras loss classes (which
  cast y_pred to their dtype, float32 by default)."""
  name, options, y_pred, labels = data.draw(output_loss_case(dtype))
  function, loss_class = OUTPUT_LOSSES[name]
  if name == "hinge":
    xent = data.draw(st.sampled_from([0.0, 1.0]))
    loss = loss_class(cross_entropy_weight=xent, **options)
  else:
    loss = loss_class(**options)
  y_pred = tf.constant(y_pred, dtype)
  classes = y_pred.shape[1]
  if name in ("l_softmax", "sphereface"):
    classes //= 2
  y_true = labels if data.draw(st.booleans()) else np.eye(classes)[labels]
  with tf.GradientTape() as tape:
    tape.watch(y_pred)
    per_example = function(y_true, y_pred, **options)
  assert_finite(f"{name} function", per_example)
  assert_gradients_finite(f"d {name} / d y_pred", [tape.gradient(per_example, y_pred)])
  y_in = tf.cast(y_pred, loss.dtype)
  with tf.GradientTape() as tape:
    tape.watch(y_in)
    value = loss(y_true, y_in)
  assert_finite(f"{name} loss", value)
  assert_gradients_finite(f"d {name} loss / d y_pred", [tape.gradient(value, y_in)])


def test_output_margines_compute_half_precision_in_float32():
  """Regression: with float16 y_pred a margin, scale or logit beyond float16's
  range (the hinge margin 1e30, AM-Softmax / ArcFace scale 1e5, an L-Softmax
  target logit of -140000) became inf and the loss inf or NaN; half precision is
  now widened to float32."""
  labels = np.array([0, 1])
  scores = tf.constant([[0.5, -0.25, 0.0], [1.0, 0.0, -1.0]], tf.float16)
  for variant in ("crammer_singer", "weston_watkins"):
    with tf.GradientTape() as tape:
      tape.watch(scores)
      value = output_margin.multiclass_hinge(labels, scores, variant, margin=1e30)
    assert value.dtype == tf.float32
    assert_finite("multiclass_hinge", value)
    assert_gradients_finite("multiclass_hinge", [tape.gradient(value, scores)])
  for function in (output_margin.am_softmax, output_margin.arcface):
    # (The gradient w.r.t. float16 cos, about the scale, is beyond float16's range.)
    assert_finite(function.__name__, function(labels, scores, scale=1e5))
  # L-Softmax, m = 4 at theta_y = pi: the target logit 20000 * psi = 20000 * (-7)
  # is beyond float16's range.
  head_output = tf.constant([[-1.0, 0.5, 20000.0, 20000.0]], tf.float16)
  value = output_margin.l_softmax([0], head_output, m=4)
  assert_finite("l_softmax", value)
  np.testing.assert_allclose(value.numpy(), [20000.0 * (0.5 - psi_m4(-1.0))], rtol=1e-3)


def psi_m4(cos):
  """L-Softmax's psi(theta) for m = 4 (theta = arccos(cos))."""
  theta = np.arccos(cos)
  k = np.floor(theta / (np.pi / 4))
  return (-1.0) ** k * np.cos(4 * theta) - 2 * k


@st.composite
def head_case(draw, dtype):
  batch = draw(st.integers(1, 8))
  classes = draw(st.integers(2, 5))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  kind = draw(st.sampled_from(["random", "zero", "one_zero_row", "scaled"]))
  features = rng.normal(size=(batch, 5))
  if kind == "zero":
    features = np.zeros_like(features)
  elif kind == "one_zero_row":
    features[0] = 0.0
  elif kind == "scaled":
    top = 3 if dtype == "float16" else 30
    features = features * 10.0 ** draw(st.integers(-30, top))
  labels = draw(labels_strategy(batch, classes))
  return features, labels, classes


@pytest.mark.parametrize("dtype", DTYPES)
@budget(10)
@hypothesis.given(data=st.data())
def test_cosine_head_with_its_losses_is_finite(dtype, data):
  """`CosineHead` (under the dtype's policy) feeding the loss it is configured for:
  head output, loss and gradients w.r.t. the features and the kernel are finite."""
  features, labels, classes = data.draw(head_case(dtype))
  loss = data.draw(
      st.sampled_from(
          [
              tlm.AMSoftmax(),
              tlm.ArcFace(),
              tlm.LSoftmax(m=data.draw(st.integers(1, 4))),
              tlm.SphereFace(),
          ]
      )
  )
  head = tlm.CosineHead(classes, dtype=POLICIES[dtype], **loss.head_config)
  head.build((None, features.shape[1]))
  x = tf.constant(features, head.compute_dtype)
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = head(x)
    value = loss(labels, out)
  assert_finite("head output", out)
  assert_finite("loss", value)
  feature_gradient, kernel_gradient = tape.gradient(value, [x, head.kernel])
  assert_gradients_finite("d loss / d kernel", [kernel_gradient])
  if dtype == "float16" and np.min(np.linalg.norm(features, axis=1)) < 1e-2:
    # Known (test_float16_cosine_head_feature_gradient_overflows_at_zero_features):
    # d cos / d x ~ 1 / max(||x||, 1e-6) overflows float16.
    return
  assert_gradients_finite("d loss / d features", [feature_gradient])


@pytest.mark.xfail(
    strict=True,
    reason="Finding (not fixed: inherent to float16 with the norm floor 1e-6): for "
    "zero features, d cos / d x = w_hat / max(||x||, 1e-6) is 1e6 times the loss "
    "gradient, beyond float16's 65504: the gradient w.r.t. float16 features is inf "
    "(the output, the loss and the kernel gradient are finite).",
)
def test_float16_cosine_head_feature_gradient_overflows_at_zero_features():
  head = tlm.CosineHead(3, dtype="mixed_float16")
  x = tf.zeros([2, 5], tf.float16)
  with tf.GradientTape() as tape:
    tape.watch(x)
    value = tlm.AMSoftmax()([0, 1], head(x))
  assert_finite("loss", value)
  assert_gradients_finite("d loss / d features", [tape.gradient(value, x)])


@pytest.mark.parametrize(
    "dtype,features",
    [
        ("float16", np.zeros([2, 5])),  # the norm floor 1e-12 was 0 in float16: 0/0
        ("float16", np.full([2, 5], 1e-3)),  # squares underflowed to 0
        ("float16", np.full([2, 5], 300.0)),  # squares overflowed: ||x|| = inf
        ("bfloat16", np.full([2, 5], 1e20)),
        ("float32", np.full([2, 5], 1e30)),
        ("float64", np.full([2, 5], 1e160)),  # squares overflowed: 1e320
    ],
)
def test_cosine_head_norms_neither_overflow_nor_underflow(dtype, features):
  """Regression: CosineHead's norms squared x, so its output was NaN or inf for
  zero or small float16 features and for |x| > 1e19 in float32 (NaN with
  L-Softmax / SphereFace, whose scale output is ||x|| ||w_j||)."""
  head = tlm.CosineHead(3, dtype=POLICIES[dtype], **tlm.LSoftmax.head_config)
  head.build((None, 5))
  x = tf.constant(features, head.compute_dtype)
  with tf.GradientTape() as tape:
    loss = tlm.LSoftmax(m=2, dtype="float64" if dtype == "float64" else None)
    value = loss([0, 1], head(x))
  out = to_numpy(head(x))
  assert_finite("head output", out)
  assert_finite("loss", value)
  assert_gradients_finite("d loss / d kernel", [tape.gradient(value, head.kernel)])
  kernel = to_numpy(head.kernel)
  largest = max(np.abs(features).max(), 1.0)  # numpy's norm squares too
  norms = largest * np.linalg.norm(features / largest, axis=1)
  expected = np.outer(np.maximum(norms, 1e-6), np.linalg.norm(kernel, axis=0))
  # float16's floor 1e-6 is subnormal there (spacing 6e-8).
  rtol = {"float16": 0.1, "bfloat16": 2e-2}.get(dtype, 1e-5)
  np.testing.assert_allclose(out[:, 3:], expected, rtol=rtol)


# ---------------------------------------------------------------------------
# Models: MarginModel and JacobianModel steps
# ---------------------------------------------------------------------------


def build_network(dtype, params, model_class=keras.Model, **kwargs):
  """The two-layer ReLU network of ``params`` (float64 arrays) as a Keras model
  built under the dtype's policy (layers "h" and "logits")."""
  w1, b1, w2, b2 = params
  with dtype_policy(POLICIES[dtype]):
    # A float64 model takes float64 inputs (Keras' default input dtype is float32).
    inputs = keras.Input((IN_DIM,), dtype="float64" if dtype == "float64" else None)
    hidden = keras.layers.Dense(HIDDEN, activation="relu", name="h")(inputs)
    logits = keras.layers.Dense(w2.shape[1], name="logits")(hidden)
    model = model_class(inputs, logits, **kwargs)
  model.get_layer("h").set_weights([w1, b1])
  model.get_layer("logits").set_weights([w2, b2])
  return model


def model_inputs(dtype, x):
  return x.astype("float64" if dtype == "float64" else "float32")


def logits_in_range(model, x):
  """The model's own forward pass is finite (the network is in its dtype's range)."""
  return bool(np.all(np.isfinite(to_numpy(model(x, training=False)))))


def check_step(model, x, labels):
  """The gradient of the step's loss w.r.t. the weights (unscaled, so that the loss
  scaling of mixed_float16 cannot hide a non-finite one) and ``train_on_batch``'s
  logs and updated weights are finite."""
  with tf.GradientTape() as tape:
    total, logits = model.total_loss(
        tf.constant(x), tf.constant(labels), training=True
    )
  assert_finite("total loss", total)
  assert_finite("logits", logits)
  assert_gradients_finite(
      "d loss / d weights", tape.gradient(total, model.trainable_weights)
  )
  logs = model.train_on_batch(x, labels, return_dict=True)
  for name, value in logs.items():
    assert_finite(f"log {name}", value)
  for weight in model.weights:
    assert_finite(weight.name, weight)


@pytest.mark.parametrize("dtype", DTYPES)
@budget(3)
@hypothesis.given(data=st.data())
def test_margin_model_step_is_finite(dtype, data):
  x, labels, params = data.draw(network_case(dtype))
  layers = data.draw(
      st.lists(
          st.sampled_from(["input", "h", "logits"]),
          min_size=1,
          max_size=3,
          unique=True,
      )
  )
  if dtype == "float16":
    # Known (test_mixed_float16_margin_model_gradient_overflows_on_zero_inputs, and
    # see test_large_margin_at_hidden_layers_is_finite).
    hypothesis.assume(not vanishing_gradient(x, params, layers))
  classes = params[2].shape[1]
  options = data.draw(margin_options(classes))
  if dtype == "float16":
    options["use_approximation"] = True
  options.update(
      cross_entropy_weight=data.draw(st.sampled_from([0.0, 1.0])),
      aggregation=data.draw(st.sampled_from(["mean", "min", 2])),
      correct_only=data.draw(st.booleans()),
  )
  model = build_network(
      dtype,
      params,
      tlm.MarginModel,
      margin_layers=layers,
      layers_weights=data.draw(st.sampled_from([None, "size"])),
  )
  x = model_inputs(dtype, x)
  hypothesis.assume(logits_in_range(model, x))
  with dtype_policy(POLICIES[dtype]):
    model.compile(keras.optimizers.SGD(1e-3), loss=tlm.LargeMarginLoss(**options))
  check_step(model, x, labels)


@pytest.mark.xfail(
    strict=True,
    reason="Finding (not fixed: inherent to float16, see "
    "test_float16_margin_gradient_overflows_at_a_dead_input_layer): under "
    "mixed_float16, zero inputs to a ReLU network without bias activity zero the "
    "input gradient, d = (p_y - p_j) / epsilon and d loss / d logits ~ 1e7 "
    "overflows the float16 logits: the gradient is non-finite, and train_on_batch's "
    "LossScaleOptimizer silently drops the update (logs and weights stay finite).",
)
def test_mixed_float16_margin_model_gradient_overflows_on_zero_inputs():
  params = (
      np.ones((IN_DIM, HIDDEN)),
      np.zeros(HIDDEN),
      np.array([[1.0, -1.0, 0.5]] * HIDDEN),
      np.array([0.0, 0.5, -0.5]),
  )
  model = build_network("float16", params, tlm.MarginModel, margin_layers=["input"])
  with dtype_policy("mixed_float16"):
    model.compile(keras.optimizers.SGD(1e-3), loss=tlm.LargeMarginLoss(gamma=1e30))
  check_step(model, np.zeros((2, IN_DIM), "float32"), np.array([0, 1], np.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@budget(3)
@hypothesis.given(data=st.data())
def test_jacobian_model_step_is_finite(dtype, data):
  x, labels, params = data.draw(network_case(dtype))
  model = build_network(
      dtype,
      params,
      tlm.JacobianModel,
      feature_layer="h",
      jacobian_weight=data.draw(st.sampled_from([0.0, 0.1, 1e4])),
      variant=data.draw(st.sampled_from(["random", "all"])),
      classifier_weight=data.draw(st.sampled_from([0.0, 1e-3])),
      seed=1,
  )
  x = model_inputs(dtype, x)
  hypothesis.assume(logits_in_range(model, x))
  loss = data.draw(
      st.sampled_from(
          [
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              tlm.MulticlassHinge(),
              tlm.MulticlassHinge(variant="weston_watkins", cross_entropy_weight=1.0),
          ]
      )
  )
  with dtype_policy(POLICIES[dtype]):
    model.compile(keras.optimizers.SGD(1e-3), loss=loss)
  check_step(model, x, labels)


def test_margin_model_with_float64_aggregation_and_epsilon_zero():
  """Regressions through the model step: a float64 MarginModel with aggregation
  "min" crashed (InvalidArgumentError); epsilon = 0 is a ValueError."""
  params = (
      np.ones((IN_DIM, HIDDEN)),
      np.zeros(HIDDEN),
      np.array([[1.0, -1.0, 0.5]] * HIDDEN),
      np.array([0.0, 0.5, -0.5]),
  )
  x, labels = np.full((3, IN_DIM), 0.5), np.array([0, 1, 1], np.int32)
  model = build_network(
      "float64", params, tlm.MarginModel, margin_layers=["input", "h"]
  )
  model.compile("sgd", loss=tlm.LargeMarginLoss(gamma=1.0, aggregation="min"))
  check_step(model, x, labels)
  model = build_network("float32", params, tlm.MarginModel, margin_layers=["input"])
  model.compile("sgd", loss=tlm.LargeMarginLoss(epsilon=0.0))
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    model.train_on_batch(x.astype("float32"), labels)


# ---------------------------------------------------------------------------
# Margin estimators, attacks, certified radius
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@budget(3)
@hypothesis.given(data=st.data())
def test_margin_estimators_are_finite(dtype, data):
  """first_order_margins (finite for epsilon > 0; with epsilon = 0, +-inf only where
  the gradient vanishes and never NaN), linearized_margins (inf only where no
  boundary is reachable, never NaN) and deepfool (finite x_adv; distances >= 0,
  inf for examples not flipped)."""
  x, labels, params = data.draw(network_case(dtype))
  model = build_network(dtype, params)
  x = model_inputs(dtype, x).astype("float32")  # the estimators take float32 inputs
  hypothesis.assume(logits_in_range(model, x))
  classes = params[2].shape[1]
  norm = data.draw(st.sampled_from([1, 2, np.inf]))
  epsilon = data.draw(st.sampled_from([1e-8, 0.0]))
  found, correct = margin_estimation.first_order_margins(
      model,
      x,
      labels,
      ["input", "h", "logits"],
      dist_norm=norm,
      top_k=data.draw(st.integers(1, classes - 1)),
      epsilon=epsilon,
  )
  assert correct.shape == labels.shape
  for name, values in found.items():
    if epsilon > 0:
      assert_finite(f"first-order margin at {name}", values)
    assert not np.any(np.isnan(values)), f"first-order margin at {name}: {values}"
  linearized = margin_estimation.linearized_margins(model, x, labels, norm)
  assert not np.any(np.isnan(linearized) | (linearized == -np.inf)), linearized
  x_adv, distances = margin_estimation.deepfool(
      model,
      x,
      labels,
      norm,
      max_iter=data.draw(st.integers(1, 4)),
      overshoot=data.draw(st.sampled_from([0.0, 0.02])),
  )
  assert_finite("deepfool x_adv", x_adv)
  assert not np.any(np.isnan(distances)) and np.all(distances >= 0), distances


def ball_tolerance(x, epsilon):
  """Rounding slack of ||x' - x|| <= epsilon in float32 at the scale of x."""
  return 1e-5 * epsilon + 8 * np.finfo(np.float32).eps * (1.0 + np.abs(x).max())


@pytest.mark.parametrize("dtype", DTYPES)
@budget(4)
@hypothesis.given(data=st.data())
def test_attacks_are_finite_and_in_the_ball(dtype, data):
  x, labels, params = data.draw(network_case(dtype))
  model = build_network(dtype, params)
  x = model_inputs(dtype, x)
  hypothesis.assume(logits_in_range(model, x))
  low, high = float(x.min()), float(x.max())
  span = max(high - low, float(np.abs(x).max()), 1e-30)
  clip_min, clip_max = low - span, high + span
  epsilon = data.draw(st.sampled_from([0.0, 0.01, 0.3])) * span
  loss = data.draw(st.sampled_from(["xent", "logit_margin"]))
  attack = data.draw(st.sampled_from(["fgsm", "iterative_fgsm", "pgd", "pgd_l2"]))
  kwargs = dict(clip_min=clip_min, clip_max=clip_max, loss=loss)
  if attack == "fgsm":
    x_adv = attacks.fgsm(model, x, labels, epsilon, **kwargs)
  elif attack == "iterative_fgsm":
    x_adv = attacks.iterative_fgsm(model, x, labels, epsilon, steps=3, **kwargs)
  else:
    norm = 2 if attack == "pgd_l2" else np.inf
    x_adv = attacks.pgd(model, x, labels, epsilon, norm=norm, steps=3, **kwargs)
  x_adv = to_numpy(x_adv)
  assert_finite(f"{attack} ({loss})", x_adv)
  assert np.all((x_adv >= clip_min) & (x_adv <= clip_max))
  delta = (x_adv - x).reshape(len(x), -1)
  size = np.linalg.norm(delta, axis=1) if attack == "pgd_l2" else np.abs(delta).max(1)
  assert np.all(size <= epsilon + ball_tolerance(x, epsilon)), (size, epsilon)


@pytest.mark.parametrize("dtype", DTYPES)
@budget(4)
@hypothesis.given(data=st.data())
def test_certified_radius_is_finite(dtype, data):
  x, labels, params = data.draw(network_case(dtype))
  model = build_network(dtype, params)
  x = model_inputs(dtype, x)
  hypothesis.assume(logits_in_range(model, x))
  max_radius = data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
  box = data.draw(st.booleans())
  radius = certified.certified_radius(
      model,
      x,
      labels,
      norm=data.draw(st.sampled_from([2, np.inf])),
      method="ibp",
      max_radius=max_radius,
      steps=data.draw(st.integers(1, 6)),
      clip_min=float(x.min()) - 1.0 if box else None,
      clip_max=float(x.max()) + 1.0 if box else None,
  )
  assert_finite("certified radius", radius)
  assert np.all((radius >= 0) & (radius <= max_radius)), radius


def test_certified_radius_of_a_float64_model():
  """Regression: the reproduction check cast x to float32 before calling the model,
  so every float64 model (float64 input layer) failed it (relative error ~1e-8 >
  1e-8) with a ValueError blaming a layer subclass."""
  rng = np.random.default_rng(3)
  params = (
      rng.normal(size=(IN_DIM, HIDDEN)),
      0.1 * rng.normal(size=HIDDEN),
      rng.normal(size=(HIDDEN, 3)),
      0.1 * rng.normal(size=3),
  )
  model = build_network("float64", params)
  x = 10.0 * rng.random((8, IN_DIM))
  labels = np.argmax(to_numpy(model(x)), axis=1)
  radius = certified.certified_radius(model, x, labels, steps=30)
  assert np.all(np.isfinite(radius)) and np.all(radius > 0)


def test_l2_pgd_with_float64_inputs():
  """Regression: the l_2 projection raised TypeError for float64 inputs
  (tf.minimum(1.0, float64 tensor))."""
  model = build_network(
      "float64",
      (np.ones((IN_DIM, HIDDEN)), np.zeros(HIDDEN), np.eye(HIDDEN, 3), np.zeros(3)),
  )
  x = np.full((2, IN_DIM), 0.5)
  x_adv = attacks.pgd(model, x, [0, 1], 0.1, norm=2, steps=2)
  assert x_adv.dtype == tf.float64
  assert np.all(np.linalg.norm(to_numpy(x_adv) - x, axis=1) <= 0.1 + 1e-12)
