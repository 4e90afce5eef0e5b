"""Attacks: closed-form optima on a linear model, constraints, monotonicity, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import attacks
from tf_large_margin import margin_loss

DIM = 6


def linear_model(w, b):
  """logits = x @ w + b."""
  model = keras.Sequential([keras.Input((w.shape[0],)), keras.layers.Dense(w.shape[1])])
  model.layers[0].set_weights([w.astype("float32"), b.astype("float32")])
  return model


def binary_problem():
  """A two-class linear model and interior inputs it classifies as class 0 with a
  logit gap of at least 1 (so an l_inf or l_2 step of 0.05 cannot flip them)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(DIM, 2))
  w[:, 1] = w[:, 0] + np.array([1.0, -2.0, 0.5, -1.0, 1.5, -0.7])  # w_1 - w_0: no zeros
  x = rng.uniform(0.3, 0.7, size=(16, DIM)).astype("float32")
  gap = x @ (w[:, 0] - w[:, 1])
  b = np.array([1.0 - gap.min(), 0.0])  # z_0 - z_1 = gap - min(gap) + 1 >= 1
  return linear_model(w, b), x, np.zeros(16, np.int64), w[:, 1] - w[:, 0]


def relu_model(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential(
      [
          keras.Input((DIM,)),
          keras.layers.Dense(32, activation="relu"),
          keras.layers.Dense(32, activation="relu"),
          keras.layers.Dense(4),
      ]
  )


def relu_problem(n=64, seed=0):
  model = relu_model(seed)
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, size=(n, DIM)).astype("float32")
  x[: n // 4] = np.round(x[: n // 4])  # corners of the data range
  labels = np.argmax(model(x), axis=1)  # all correctly classified
  return model, x, labels


def xent(model, x, labels):
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, model(x)).numpy()


def test_fgsm_is_the_closed_form_linf_optimum():
  model, x, labels, direction = binary_problem()
  epsilon = 0.05
  expected = x + epsilon * np.sign(direction)
  np.testing.assert_allclose(
      attacks.fgsm(model, x, labels, epsilon), expected, atol=1e-6
  )


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_pgd_reaches_the_closed_form_optimum(norm):
  model, x, labels, direction = binary_problem()
  epsilon = 0.05
  # The loss grows with <w_1 - w_0, x>: its maximiser in the ball is x + epsilon * u,
  # u = sign(w_1 - w_0) (l_inf) or (w_1 - w_0) / ||w_1 - w_0||_2 (l_2).
  unit = np.sign(direction) if norm == np.inf else direction / np.linalg.norm(direction)
  optimum = x + epsilon * unit
  x_adv = attacks.pgd(
      model,
      x,
      labels,
      epsilon,
      norm=norm,
      steps=40,
      step_size=epsilon / 2,
      random_start=True,
      seed=(3, 4),
  )
  np.testing.assert_allclose(x_adv, optimum, atol=1e-5)
  np.testing.assert_allclose(
      xent(model, x_adv, labels), xent(model, optimum, labels), rtol=1e-5
  )


@pytest.mark.parametrize("norm", [np.inf, 2])
@pytest.mark.parametrize("clip_range", [(0.0, 1.0), (-1.0, 2.0)])
def test_pgd_stays_inside_the_ball_and_the_data_range(norm, clip_range):
  model, x, labels = relu_problem()
  low, high = clip_range
  x = low + (high - low) * x
  epsilon = 0.3 if norm == np.inf else 1.5
  x_adv = attacks.pgd(
      model,
      x,
      labels,
      epsilon,
      norm=norm,
      steps=7,
      step_size=epsilon,
      clip_min=low,
      clip_max=high,
  ).numpy()
  distances = margin_loss.flat_norm(x_adv - x, norm).numpy()
  assert np.all(distances <= epsilon * (1 + 1e-6))
  assert np.all(x_adv >= low) and np.all(x_adv <= high)
  assert np.mean(distances > 0.5 * epsilon) > 0.5  # the attack did move the points
  assert np.any(x_adv == low) and np.any(x_adv == high)  # and met the range


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_more_steps_never_lower_attack_success(norm):
  model, x, labels = relu_problem(n=128)
  epsilon = 0.08 if norm == np.inf else 0.15
  successes = []
  for steps in range(1, 9):
    x_adv = attacks.pgd(
        model,
        x,
        labels,
        epsilon,
        norm=norm,
        steps=steps,
        step_size=epsilon / 4,
        seed=(1, 2),
    )
    successes.append(np.argmax(model(x_adv), axis=1) != labels)
  for fewer, more in zip(successes, successes[1:]):
    assert np.all(more[fewer])  # every success with fewer steps is kept
  assert successes[-1].sum() > successes[0].sum() > 0


def test_iterative_fgsm_is_stronger_than_fgsm():
  model, x, labels = relu_problem(n=128)
  fgsm_success = np.argmax(model(attacks.fgsm(model, x, labels, 0.08)), 1) != labels
  bim_success = (
      np.argmax(model(attacks.iterative_fgsm(model, x, labels, 0.08, steps=10)), 1)
      != labels
  )
  assert bim_success.sum() > fgsm_success.sum()
  np.testing.assert_array_equal(
      attacks.iterative_fgsm(model, x, labels, 0.08, steps=10),
      attacks.pgd(model, x, labels, 0.08, steps=10, random_start=False),
  )


def test_zero_epsilon_and_zero_sigma_leave_the_input_unchanged():
  model, x, labels = relu_problem()
  np.testing.assert_array_equal(attacks.fgsm(model, x, labels, 0.0), x)
  np.testing.assert_array_equal(attacks.pgd(model, x, labels, 0.0, norm=2), x)
  np.testing.assert_array_equal(attacks.gaussian_noise(x, 0.0), x)


def test_gaussian_noise_statistics_seed_and_clipping():
  x = np.full((200, 50), 0.5, np.float32)
  noisy = attacks.gaussian_noise(x, 0.1, seed=(5, 6)).numpy()
  assert abs(np.mean(noisy - x)) < 0.002
  assert abs(np.std(noisy - x) - 0.1) < 0.002
  np.testing.assert_array_equal(noisy, attacks.gaussian_noise(x, 0.1, seed=(5, 6)))
  assert not np.array_equal(noisy, attacks.gaussian_noise(x, 0.1, seed=(5, 7)))
  clipped = attacks.gaussian_noise(x, 2.0, seed=(5, 6)).numpy()
  assert clipped.min() == 0.0 and clipped.max() == 1.0


def test_robust_accuracy_white_box_and_black_box():
  model, x, labels = relu_problem(n=40)
  source = relu_model(seed=1)
  labels[::4] = (labels[::4] + 1) % 4  # some clean errors
  dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)
  assert attacks.robust_accuracy(model, dataset) == pytest.approx(0.75)

  def accuracy(inputs):
    return np.mean(np.argmax(model(inputs), axis=1) == labels)

  white = attacks.robust_accuracy(model, dataset, "fgsm", epsilon=0.1)
  black = attacks.robust_accuracy(
      model, dataset, "fgsm", source_model=source, epsilon=0.1
  )
  crafted = np.concatenate(
      [
          attacks.fgsm(source, x[i : i + 16], labels[i : i + 16], 0.1)
          for i in range(0, 40, 16)
      ]
  )
  assert white == pytest.approx(accuracy(attacks.fgsm(model, x, labels, 0.1)))
  assert black == pytest.approx(accuracy(crafted))
  assert white < black  # the two differ, so the source model was used
  noisy = attacks.robust_accuracy(model, dataset, "gaussian", sigma=0.2, seed=3)
  by_hand = np.concatenate(
      [
          attacks.gaussian_noise(x[i : i + 16], 0.2, seed=(3, i // 16))
          for i in range(0, 40, 16)
      ]
  )
  assert noisy == pytest.approx(accuracy(by_hand))


# ---------------------------------------------------------------------------
# Attack objective: cross-entropy vs logit margin, gradient masking
# ---------------------------------------------------------------------------

SATURATION = 1e4


def saturated_problem(n=128, seed=0, min_gap=0.02):
  """``(saturated, base, x, labels)``: a ReLU network ``base``, the same network
  with its logits scaled by 1e4 (``saturated``), and inputs it classifies as
  ``labels`` with a logit gap >= ``min_gap`` (>= 200 after scaling, so the other
  softmax probabilities exp(-200) underflow to exactly 0 in float32)."""
  base, x, labels = relu_problem(n, seed)
  top2 = np.sort(base(x).numpy(), axis=1)[:, -2:]
  keep = top2[:, 1] - top2[:, 0] >= min_gap
  inputs = keras.Input((DIM,))
  saturated = keras.Model(inputs, keras.layers.Rescaling(SATURATION)(base(inputs)))
  return saturated, base, x[keep], labels[keep]


def accuracy(model, x, labels):
  return np.mean(np.argmax(model(x), axis=1) == labels)


def test_logit_margin_is_the_runner_up_logit_minus_the_label_logit():
  logits = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0], [1.0, 1.0, 4.0]], np.float32)
  labels = np.array([0, 2, 2])
  expected = [2.0 - 3.0, 5.0 - (-1.0), 1.0 - 4.0]
  np.testing.assert_array_equal(
      attacks.logit_margin(tf.constant(logits), tf.constant(labels, tf.int32)),
      expected,
  )
  np.testing.assert_array_equal(
      attacks.attack_objective(logits, tf.constant(labels, tf.int32), "logit_margin"),
      expected,
  )


def test_saturated_softmax_masks_the_cross_entropy_gradient():
  saturated, base, x, labels = saturated_problem()
  assert len(labels) > 90
  assert attacks.zero_gradient_fraction(saturated, x, labels) == 1.0
  assert attacks.zero_gradient_fraction(saturated, x, labels, threshold=0.0) == 1.0
  assert attacks.zero_gradient_fraction(saturated, x, labels, "logit_margin") == 0.0
  assert attacks.zero_gradient_fraction(base, x, labels, loss="xent") == 0.0
  assert attacks.zero_gradient_fraction(base, x, labels, "logit_margin") == 0.0


def test_zero_gradient_fraction_counts_examples():
  # A two-class model with logit gap z_0 - z_1 = 2e3 x.
  w = np.array([[1.0, -1.0]], np.float32) * 1e3
  model = linear_model(w, np.zeros(2, np.float32))
  x = np.array([[0.5], [0.2], [0.001], [0.0005]], np.float32)
  labels = np.zeros(4, np.int64)
  # Gaps 1000, 400 (exp(-gap) = 0 in float32), 2 and 1 (nonzero gradients).
  assert attacks.zero_gradient_fraction(model, x, labels) == 0.5
  # A huge threshold counts every example.
  assert attacks.zero_gradient_fraction(model, x, labels, threshold=1e6) == 1.0


@pytest.mark.parametrize("epsilon", [0.1, 0.2])
def test_fgsm_with_the_logit_margin_defeats_gradient_masking(epsilon):
  saturated, base, x, labels = saturated_problem()
  assert accuracy(saturated, x, labels) == 1.0
  x_xent = attacks.fgsm(saturated, x, labels, epsilon)
  np.testing.assert_array_equal(x_xent, x)  # sign(0) = 0: the attack does nothing
  assert accuracy(saturated, x_xent, labels) == 1.0
  x_margin = attacks.fgsm(saturated, x, labels, epsilon, loss="logit_margin")
  assert accuracy(saturated, x_margin, labels) < 0.9
  # Scaling the logits scales the logit margin and not its gradient's sign: the
  # margin-objective attack finds the unscaled network's adversarial accuracy.
  x_base = attacks.fgsm(base, x, labels, epsilon, loss="logit_margin")
  assert accuracy(saturated, x_margin, labels) == accuracy(base, x_base, labels)
  # The unsaturated network's cross-entropy attack does flip predictions.
  assert accuracy(base, attacks.fgsm(base, x, labels, epsilon), labels) < 1.0


def test_iterative_attacks_with_the_logit_margin_defeat_gradient_masking():
  saturated, _, x, labels = saturated_problem()
  for attack in (
      lambda loss: attacks.iterative_fgsm(saturated, x, labels, 0.1, loss=loss),
      lambda loss: attacks.pgd(
          saturated, x, labels, 0.1, random_start=False, loss=loss
      ),
      lambda loss: attacks.pgd(
          saturated, x, labels, 0.5, norm=2, random_start=False, loss=loss
      ),
  ):
    np.testing.assert_array_equal(attack("xent"), x)  # zero gradients: no step
    assert accuracy(saturated, attack("logit_margin"), labels) < 0.7


def test_robust_accuracy_with_the_logit_margin():
  saturated, _, x, labels = saturated_problem()
  dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(32)
  assert attacks.robust_accuracy(saturated, dataset, "fgsm", epsilon=0.1) == 1.0
  robust = attacks.robust_accuracy(
      saturated, dataset, "fgsm", epsilon=0.1, loss="logit_margin"
  )
  by_hand = np.concatenate(
      [
          attacks.fgsm(
              saturated, x[i : i + 32], labels[i : i + 32], 0.1, loss="logit_margin"
          )
          for i in range(0, len(x), 32)
      ]
  )
  assert robust == pytest.approx(accuracy(saturated, by_hand, labels))
  assert robust < 0.9
  pgd = attacks.robust_accuracy(
      saturated, dataset, "pgd", epsilon=0.1, steps=5, loss="logit_margin"
  )
  assert pgd <= robust


def test_logit_margin_fgsm_on_an_affine_model_is_exact():
  # x' = x - epsilon * sign(w_y - w_j*), j* = argmax_{j != y} z_j.
  rng = np.random.default_rng(1)
  w = rng.normal(size=(DIM, 5)).astype("float32")
  b = rng.normal(size=5).astype("float32")
  model = linear_model(w, b)
  x = rng.uniform(0.2, 0.8, size=(40, DIM)).astype("float32")
  labels = rng.integers(0, 5, size=40)  # correct and wrong labels
  logits = model(x).numpy()
  others = np.where(np.eye(5, dtype=bool)[labels], -np.inf, logits)
  runner_up = np.argmax(others, axis=1)
  assert np.all(np.sort(others, axis=1)[:, -1] > np.sort(others, axis=1)[:, -2])
  difference = w[:, labels].T - w[:, runner_up].T  # [batch, DIM], w_y - w_j*
  assert np.all(difference != 0)
  epsilon = np.float32(0.05)
  expected = x - epsilon * np.sign(difference)
  np.testing.assert_array_equal(
      attacks.fgsm(model, x, labels, epsilon, loss="logit_margin"), expected
  )
  # One l_inf PGD step of size epsilon from x is the same point for the examples
  # classified correctly; PGD leaves the misclassified ones at x.
  correct = np.argmax(logits, axis=1) == labels
  assert 0 < correct.sum() < len(labels)
  np.testing.assert_array_equal(
      attacks.pgd(
          model,
          x,
          labels,
          epsilon,
          steps=1,
          step_size=epsilon,
          random_start=False,
          loss="logit_margin",
      ),
      np.where(correct[:, None], expected, x),
  )


def test_default_loss_is_the_cross_entropy():
  model, x, labels = relu_problem(n=64)
  labels[::3] = (labels[::3] + 1) % 4
  # The previous behaviour, by hand: x + epsilon * sign(grad_x xent), clipped.
  x_tensor = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x_tensor)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.constant(labels, tf.int32), model(x_tensor, training=False)
    )
  reference = np.clip(x + 0.1 * np.sign(tape.gradient(loss, x_tensor)), 0.0, 1.0)
  default = attacks.fgsm(model, x, labels, 0.1).numpy()
  np.testing.assert_allclose(default, reference, atol=1e-6)
  np.testing.assert_array_equal(
      default, attacks.fgsm(model, x, labels, 0.1, loss="xent")
  )
  for kwargs in (dict(norm=np.inf, seed=(1, 2)), dict(norm=2, steps=4)):
    np.testing.assert_array_equal(
        attacks.pgd(model, x, labels, 0.2, **kwargs),
        attacks.pgd(model, x, labels, 0.2, loss="xent", **kwargs),
    )
  np.testing.assert_array_equal(
      attacks.iterative_fgsm(model, x, labels, 0.1, steps=3),
      attacks.iterative_fgsm(model, x, labels, 0.1, steps=3, loss="xent"),
  )
  assert not np.array_equal(  # the two objectives do differ on this model
      attacks.pgd(model, x, labels, 0.2, loss="xent"),
      attacks.pgd(model, x, labels, 0.2, loss="logit_margin"),
  )
  dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)
  assert attacks.robust_accuracy(
      model, dataset, "pgd", epsilon=0.1
  ) == attacks.robust_accuracy(model, dataset, "pgd", epsilon=0.1, loss="xent")


class TestErrors:

  def setup_method(self):
    self.model, self.x, self.labels = relu_problem(n=4)

  @pytest.mark.parametrize("epsilon", [-0.1, np.nan, np.inf, "big"])
  def test_bad_epsilon(self, epsilon):
    with pytest.raises(ValueError, match="epsilon"):
      attacks.fgsm(self.model, self.x, self.labels, epsilon)
    with pytest.raises(ValueError, match="epsilon"):
      attacks.pgd(self.model, self.x, self.labels, epsilon)

  def test_bad_sigma_steps_step_size(self):
    with pytest.raises(ValueError, match="sigma"):
      attacks.gaussian_noise(self.x, -1.0)
    with pytest.raises(ValueError, match="steps"):
      attacks.pgd(self.model, self.x, self.labels, 0.1, steps=0)
    with pytest.raises(ValueError, match="steps"):
      attacks.iterative_fgsm(self.model, self.x, self.labels, 0.1, steps=2.5)
    with pytest.raises(ValueError, match="step_size"):
      attacks.pgd(self.model, self.x, self.labels, 0.1, step_size=-1.0)

  @pytest.mark.parametrize("loss", ["cw", "XENT", "", None, 1])
  def test_unknown_loss(self, loss):
    match = r"loss must be one of \('xent', 'logit_margin'\)"
    with pytest.raises(ValueError, match=match):
      attacks.fgsm(self.model, self.x, self.labels, 0.1, loss=loss)
    with pytest.raises(ValueError, match=match):
      attacks.pgd(self.model, self.x, self.labels, 0.1, loss=loss)
    with pytest.raises(ValueError, match=match):
      attacks.iterative_fgsm(self.model, self.x, self.labels, 0.1, loss=loss)
    with pytest.raises(ValueError, match=match):
      attacks.zero_gradient_fraction(self.model, self.x, self.labels, loss=loss)
    with pytest.raises(ValueError, match=match):
      attacks.robust_accuracy(
          self.model, [(self.x, self.labels)], "fgsm", epsilon=0.1, loss=loss
      )

  @pytest.mark.parametrize("threshold", [-1e-30, np.nan, "tiny"])
  def test_bad_zero_gradient_threshold(self, threshold):
    with pytest.raises(ValueError, match="threshold"):
      attacks.zero_gradient_fraction(
          self.model, self.x, self.labels, threshold=threshold
      )

  @pytest.mark.parametrize("norm", [1, 3, "l2", None])
  def test_unknown_norm(self, norm):
    with pytest.raises(ValueError, match="norm must be 2 or np.inf"):
      attacks.pgd(self.model, self.x, self.labels, 0.1, norm=norm)

  @pytest.mark.parametrize(
      "output",
      [
          lambda h: keras.layers.Dense(1)(h)[:, 0],  # [batch]
          lambda h: keras.layers.Reshape((2, 2))(
              keras.layers.Dense(4)(h)
          ),  # [batch, 2, 2]
          lambda h: [keras.layers.Dense(3)(h), keras.layers.Dense(3)(h)],  # two outputs
      ],
  )
  def test_model_without_logits_of_the_right_shape(self, output):
    inputs = keras.Input((DIM,))
    model = keras.Model(inputs, output(inputs))
    with pytest.raises(ValueError, match=r"logits of shape \[batch, classes\]"):
      attacks.fgsm(model, self.x, self.labels, 0.1)

  @pytest.mark.parametrize(
      "labels, match",
      [
          ([0, 1, 2, 4], r"labels must be in \[0, 4\).*labels\[3\] = 4"),
          ([0, -1, 2, 3], r"labels\[1\] = -1"),
          ([0.0, 1.0, 2.0, 3.0], "integer"),
          ([0, 1, 2], r"shape \[batch\] = \(4,\)"),
          ([[0], [1], [2], [3]], "shape"),
      ],
  )
  def test_bad_labels(self, labels, match):
    with pytest.raises(ValueError, match=match):
      attacks.pgd(self.model, self.x, np.array(labels), 0.1)

  def test_inputs_outside_the_data_range_or_bad_range(self):
    with pytest.raises(ValueError, match=r"data range .*\[0.0, 1.0\]"):
      attacks.fgsm(self.model, self.x + 1.0, self.labels, 0.1)
    with pytest.raises(ValueError, match="clip_min must be < clip_max"):
      attacks.fgsm(self.model, self.x, self.labels, 0.1, clip_min=1.0, clip_max=0.0)
    with pytest.raises(ValueError, match="float"):
      attacks.fgsm(self.model, np.zeros((4, DIM), np.int32), self.labels, 0.1)

  def test_unknown_attack(self):
    dataset = [(self.x, self.labels)]
    with pytest.raises(ValueError, match="Unknown attack 'deepfool'"):
      attacks.robust_accuracy(self.model, dataset, "deepfool", epsilon=0.1)
    with pytest.raises(ValueError, match="no attack arguments"):
      attacks.robust_accuracy(self.model, dataset, epsilon=0.1)
    with pytest.raises(ValueError, match="empty"):
      attacks.robust_accuracy(self.model, [])
