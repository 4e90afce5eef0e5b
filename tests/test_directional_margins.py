"""Alignment and distance along fixed directions, against per-example references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import attacks
from tf_large_margin import directional_margins

NORMS = [1, 2, np.inf]
DUAL = {1: np.inf, 2: 2, np.inf: 1}
DIM = 6
CLASSES = 4


def affine_model(seed=0):
  rng = np.random.default_rng(seed)
  w, b = rng.normal(size=(DIM, CLASSES)), 0.3 * rng.normal(size=CLASSES)
  model = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(CLASSES)])
  model.layers[0].set_weights([w.astype("float32"), b.astype("float32")])
  return model, w, b


def margin_gradient(w, b, x, y):
  """grad_x (z_y - max_{j != y} z_j) of the affine model, in float64."""
  z = x.astype(np.float64) @ w + b
  runner_up = max((k for k in range(CLASSES) if k != y), key=lambda k: z[k])
  return w[:, y] - w[:, runner_up]


def reference_alignment(w, b, x, labels, u, norm, low, high):
  values = []
  for x_i, y, u_i in zip(x, labels, u):
    g = margin_gradient(w, b, x_i, y)
    u_f = np.where(((x_i <= low) & (u_i < 0)) | ((x_i >= high) & (u_i > 0)), 0.0, u_i)
    g_f = np.where(((x_i <= low) & (g > 0)) | ((x_i >= high) & (g < 0)), 0.0, g)
    scale = np.linalg.norm(g_f, DUAL[norm]) * np.linalg.norm(u_f, norm)
    values.append(-g @ u_f / scale if scale else 0.0)
  return np.array(values)


@pytest.mark.parametrize("norm", NORMS)
def test_alignment_matches_a_per_example_reference_without_a_data_range(norm):
  model, w, b = affine_model()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, DIM)).astype("float32")
  labels = rng.integers(0, CLASSES, size=16)
  u = rng.normal(size=x.shape).astype("float32")
  got = directional_margins.direction_alignment(
      model, x, labels, u, norm, clip_min=-np.inf, clip_max=np.inf
  )
  want = reference_alignment(w, b, x, labels, u, norm, -np.inf, np.inf)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(got) <= 1 + 1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_alignment_keeps_only_the_feasible_coordinates_at_the_data_bounds(norm):
  model, w, b = affine_model(seed=2)
  rng = np.random.default_rng(3)
  x = rng.uniform(size=(32, DIM)).astype("float32")
  x[rng.uniform(size=x.shape) < 0.3] = 0.0
  x[rng.uniform(size=x.shape) < 0.3] = 1.0
  labels = rng.integers(0, CLASSES, size=32)
  u = np.sign(rng.normal(size=x.shape)).astype("float32")
  got = directional_margins.direction_alignment(model, x, labels, u, norm)
  want = reference_alignment(w, b, x, labels, u, norm, 0.0, 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Without the box the numbers differ: the test sees the masking.
  free = reference_alignment(w, b, x, labels, u, norm, -np.inf, np.inf)
  assert np.max(np.abs(free - want)) > 1e-2


def test_alignment_is_one_along_the_models_own_fgsm_direction():
  model, _, _ = affine_model(seed=4)
  x = np.random.default_rng(5).uniform(0.2, 0.8, size=(10, DIM)).astype("float32")
  labels = np.argmax(model(x), axis=1)
  _, gradient = attacks.loss_gradient(model, tf.constant(x), labels, attacks.LOGIT_MARGIN)
  got = directional_margins.direction_alignment(model, x, labels, np.sign(gradient))
  np.testing.assert_allclose(got, 1.0, rtol=1e-6)
  opposite = directional_margins.direction_alignment(model, x, labels, -np.sign(gradient))
  np.testing.assert_allclose(opposite, -1.0, rtol=1e-6)


def test_directional_margin_is_the_first_grid_point_past_the_exact_crossing():
  model, w, b = affine_model(seed=6)
  rng = np.random.default_rng(7)
  x = rng.normal(size=(40, DIM)).astype("float32")
  z = x.astype(np.float64) @ w + b
  labels = np.argmax(z, axis=1)
  labels[:5] = (labels[:5] + 1) % CLASSES  # misclassified: 0
  u = rng.normal(size=x.shape).astype("float32")
  max_distance, steps = 2.0, 40
  got = directional_margins.directional_margins(
      model, x, labels, u, max_distance, steps, clip_min=-np.inf, clip_max=np.inf
  )
  grid = max_distance * np.arange(steps + 1) / steps
  for i in range(len(x)):
    y = labels[i]
    if np.argmax(z[i]) != y:
      assert got[i] == 0.0
      continue
    # z_y - z_k along x + t u: (z_y - z_k) - t (w_k - w_y) u; first k to cross.
    crossings = [
        (z[i, y] - z[i, k]) / ((w[:, k] - w[:, y]) @ u[i])
        for k in range(CLASSES)
        if k != y and (w[:, k] - w[:, y]) @ u[i] > 0
    ]
    t = min(crossings, default=np.inf)
    later = grid[grid >= t]
    assert got[i] == pytest.approx(later[0] if later.size else np.inf, rel=1e-6), i
  assert np.isinf(got).any() and (got[5:] > 0).all()


def test_directional_margin_says_where_transferred_fgsm_succeeds():
  keras.utils.set_random_seed(0)

  def mlp():
    return keras.Sequential(
        [keras.Input((DIM,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(CLASSES)]
    )

  source, target = mlp(), mlp()
  rng = np.random.default_rng(8)
  x = rng.uniform(size=(64, DIM)).astype("float32")
  x[:, 0] = 0.0  # coordinates at the bounds: clipping matters
  x[:, 1] = 1.0
  labels = np.argmax(target(x), axis=1)
  labels[:4] = (labels[:4] + 1) % CLASSES
  _, gradient = attacks.loss_gradient(source, tf.constant(x), labels)
  steps, max_distance = 10, 1.0
  radii = directional_margins.directional_margins(
      target, x, labels, np.sign(gradient), max_distance, steps
  )
  first_fooled = np.full(len(x), np.inf)
  for epsilon in (max_distance * np.arange(steps + 1) / steps)[::-1]:
    adversarial = attacks.fgsm(source, x, labels, float(epsilon))
    fooled = attacks.misclassified(target(adversarial), labels).numpy()
    first_fooled[fooled] = epsilon
  # The smallest grid radius at which transferred FGSM fools the target (the
  # prediction may flip back further along the line: not monotone).
  np.testing.assert_allclose(radii, first_fooled, rtol=1e-6)
  assert (radii[:4] == 0).all() and 0 < np.mean(np.isfinite(radii[4:])) < 1


def test_bad_arguments_raise():
  model, _, _ = affine_model()
  x = np.full((3, DIM), 0.5, "float32")
  labels = [0, 1, 2]
  with pytest.raises(ValueError, match="directions must have the inputs. shape"):
    directional_margins.direction_alignment(model, x, labels, np.ones((3, DIM + 1)))
  with pytest.raises(ValueError, match="directions must have the inputs. shape"):
    directional_margins.directional_margins(model, x, labels, np.ones((2, DIM)), 1.0)
  with pytest.raises(ValueError, match="max_distance"):
    directional_margins.directional_margins(model, x, labels, np.ones_like(x), 0.0)
  with pytest.raises(ValueError, match="num_steps"):
    directional_margins.directional_margins(model, x, labels, np.ones_like(x), 1.0, 0)
  with pytest.raises(ValueError):
    directional_margins.direction_alignment(model, x, labels, np.ones_like(x), norm=3)
  with pytest.raises(ValueError, match="data range"):
    directional_margins.direction_alignment(model, x + 1.0, labels, np.ones_like(x))
