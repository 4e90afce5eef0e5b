"""Property tests of the margin estimators, the attacks and the certified radius:
finite results (and attacks inside their ball) on degenerate networks in every dtype
(see property_strategies for the settings)."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import attacks
from tf_large_margin import certified
from tf_large_margin import margin_estimation
from property_strategies import DTYPES
from property_strategies import HIDDEN
from property_strategies import IN_DIM
from property_strategies import assert_finite
from property_strategies import budget
from property_strategies import build_network
from property_strategies import logits_in_range
from property_strategies import model_inputs
from property_strategies import network_case
from property_strategies import to_numpy


@pytest.mark.parametrize("dtype", DTYPES)
@budget(3)
@hypothesis.given(data=st.data())
def test_margin_estimators_are_finite(dtype, data):
  """first_order_margins (finite for epsilon > 0; with epsilon = 0, +-inf only where
  the gradient vanishes and never NaN), linearized_margins (inf only where no
  boundary is reachable, never NaN) and deepfool (finite x_adv; distances >= 0,
  inf for examples not flipped). The inputs are a float32 array or a tf.Tensor of
  the model's dtype (float16 / bfloat16 ones included): the estimators cast them to
  float32."""
  x, labels, params = data.draw(network_case(dtype))
  model = build_network(dtype, params)
  x = model_inputs(dtype, x).astype("float32")
  if data.draw(st.booleans()):
    x = tf.cast(x, dtype)
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
