"""Adversarial attacks and input noise for any Keras model that returns logits.

All attacks maximise an objective L(x, y) of the model's logits z within a norm ball
of radius ``epsilon`` (in the input's units) around the clean input x, and keep the
result inside the data range [clip_min, clip_max]. The objective (``loss``) is

* ``"xent"`` (default): the softmax cross-entropy L = -log softmax(z)_y;
* ``"logit_margin"``: the logit margin of Carlini and Wagner ("Towards Evaluating the
  Robustness of Neural Networks", IEEE S&P 2017), L = max_{j != y} z_j - z_y,
  computed on the logits without a softmax.

On a large-margin model the softmax saturates: in float32 p_y rounds to 1 and the
other probabilities underflow to 0, so grad_x of the cross-entropy is exactly 0 and
the gradient attacks do not move the input (gradient masking). The logit margin's
gradient, grad_x z_{j*} - grad_x z_y, does not saturate, so robust accuracy measured
with it is not inflated by the masking; `zero_gradient_fraction` measures the masking.
The attacks:

* FGSM (Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015):
  x' = clip(x + epsilon * sign(grad_x L)).
* Iterative FGSM / BIM (Kurakin et al., "Adversarial examples in the physical world",
  2016): FGSM steps of size alpha, each followed by a projection onto the l_inf ball.
* PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
  ICLR 2018), l_inf or l_2: a random start in the ball, then steepest-ascent steps of
  size alpha (sign(g) for l_inf, g / ||g||_2 for l_2), each projected onto the ball and
  the data range.
* Gaussian noise: x' = clip(x + sigma * n), n ~ N(0, I).

The iterative attacks stop updating an example once the model misclassifies it, so on
a fixed model and start the success of an attack never decreases with more steps.

The batch functions (`fgsm`, `iterative_fgsm`, `pgd`, `gaussian_noise`,
`zero_gradient_fraction`) validate their arguments and run a `tf.function` compiled
once per model (and objective); `robust_accuracy` runs one of them over a data set.
Labels are integer class indices of shape [batch].
"""

import numpy as np
import tensorflow as tf

from tf_large_margin import argument_checks
from tf_large_margin import margin_loss
from tf_large_margin import norm_balls

ATTACK_NORMS = (2, np.inf)
XENT = "xent"
LOGIT_MARGIN = "logit_margin"
ATTACK_LOSSES = (XENT, LOGIT_MARGIN)
DEFAULT_SEED = (0, 0)
# Gradients whose entries are all at most this in magnitude count as zero (masked):
# far below any gradient a float32 attack step could use, and above the underflowed
# products of saturated softmax probabilities (float32's smallest normal is 1.2e-38).
ZERO_GRADIENT_THRESHOLD = 1e-30


# ---------------------------------------------------------------------------
# Validation (the generic checks are in `tf_large_margin.argument_checks`)
# ---------------------------------------------------------------------------


def check_attack_norm(norm):
  """Returns ``norm`` after checking it is 2 or np.inf (the attacks' balls)."""
  if norm not in ATTACK_NORMS:
    raise ValueError(f"norm must be 2 or np.inf; got {norm!r}.")
  return norm


def check_attack_loss(loss):
  """Returns ``loss`` after checking it is "xent" or "logit_margin"."""
  if not isinstance(loss, str) or loss not in ATTACK_LOSSES:
    raise ValueError(
        f"loss must be one of {ATTACK_LOSSES} (the attack objective); got {loss!r}."
    )
  return loss


def _validated(model, x, labels, clip_min, clip_max):
  """Common checks of the batch functions: ``(x as float tensor, int32 labels)``."""
  x, labels = argument_checks.float_inputs_and_labels(model, x, labels)
  argument_checks.check_data_range(x, clip_min, clip_max)
  return x, labels


# ---------------------------------------------------------------------------
# Building blocks (graph code, no validation)
# ---------------------------------------------------------------------------


def logit_margin(logits, labels):
  """[batch] logit margin of Carlini and Wagner: max_{j != y} z_j - z_y.

  Positive where the example is misclassified; no softmax, so it does not saturate.
  Its gradient is grad z_{j*} - grad z_y, j* = argmax_{j != y} z_j (shared equally
  among tied runner-up classes).
  """
  is_label = tf.one_hot(labels, tf.shape(logits)[1], on_value=True, off_value=False)
  others = tf.where(is_label, tf.constant(-np.inf, logits.dtype), logits)
  label_logit = tf.gather(logits, labels, axis=1, batch_dims=1)
  return tf.reduce_max(others, axis=1) - label_logit


def attack_objective(logits, labels, loss=XENT):
  """[batch] objective L the attacks maximise ("xent" or "logit_margin").

  xent:          L = -log softmax(z)_y
  logit_margin:  L = max_{j != y} z_j - z_y
  """
  if loss == XENT:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
  if loss == LOGIT_MARGIN:
    return logit_margin(logits, labels)
  raise ValueError(f"loss must be one of {ATTACK_LOSSES}; got {loss!r}.")


def loss_gradient(model, x, labels, loss=XENT):
  """``(logits, grad_x L)`` with L the per-example `attack_objective`.

  The model runs in inference mode; examples do not interact, so the gradient of the
  summed objective is each example's own gradient.
  """
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = model(x, training=False)
    objective = attack_objective(logits, labels, loss)
  return logits, tape.gradient(objective, x)


def gradient_is_zero(gradient, threshold=ZERO_GRADIENT_THRESHOLD):
  """[batch] bool: max_i |g_i| <= threshold for each example of ``gradient``."""
  return margin_loss.flat_norm(gradient, np.inf) <= threshold


def misclassified(logits, labels):
  """[batch] bool: argmax(logits) != label."""
  return tf.not_equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels)


@tf.function(reduce_retracing=True)
def fgsm_graph(model, x, labels, epsilon, clip_min, clip_max, loss=XENT):
  """FGSM without validation (usable inside a training step)."""
  _, gradient = loss_gradient(model, x, labels, loss)
  return tf.clip_by_value(x + epsilon * tf.sign(gradient), clip_min, clip_max)


@tf.function(reduce_retracing=True)
def pgd_graph(
    model,
    x,
    labels,
    epsilon,
    step_size,
    steps,
    norm,
    use_random_start,
    seed,
    clip_min,
    clip_max,
    loss=XENT,
):
  """PGD without validation (usable inside a training step).

  x_0 = clip(x + random start) (or x), then for t < steps, for the examples the model
  still classifies correctly: x_{t+1} = clip(x + P_eps(x_t + alpha d_t - x)), with
  d_t the steepest-ascent direction of the loss and P_eps the projection onto the
  ball. Clipping to the range after the projection keeps the point in the ball.
  """
  x_adv = x
  if use_random_start:
    x_adv = tf.clip_by_value(
        x + norm_balls.random_ball_point(x, epsilon, norm, seed), clip_min, clip_max
    )
  for _ in tf.range(steps):
    logits, gradient = loss_gradient(model, x_adv, labels, loss)
    active = norm_balls.expand_to(tf.logical_not(misclassified(logits, labels)), x)
    step = x_adv + step_size * norm_balls.steepest_ascent_direction(gradient, norm)
    stepped = tf.clip_by_value(
        x + norm_balls.project_to_ball(step - x, epsilon, norm), clip_min, clip_max
    )
    x_adv = tf.where(active, stepped, x_adv)
  return x_adv


# ---------------------------------------------------------------------------
# Batch attacks
# ---------------------------------------------------------------------------


def fgsm(model, x, labels, epsilon, clip_min=0.0, clip_max=1.0, loss=XENT):
  """Fast gradient sign method: x' = clip(x + epsilon * sign(grad_x L(x, y))).

  Goodfellow et al. 2015. On a model whose loss is linear in x inside the ball this is
  the exact maximiser of the loss under ||x' - x||_inf <= epsilon. With the logit
  margin on an affine model z = W x + b it is x' = clip(x - epsilon * sign(w_y -
  w_{j*})), j* the runner-up class (w_k the weights of class k). Where the gradient
  is exactly 0 (a saturated softmax under "xent") sign(0) = 0 leaves x unchanged.

  Args:
    model: a Keras model (or callable ``model(x, training=False)``) returning
      [batch, classes] logits.
    x: [batch, ...] float inputs inside [clip_min, clip_max].
    labels: [batch] integer labels.
    epsilon: l_inf radius, >= 0, in the input's units.
    clip_min, clip_max: the data range (default [0, 1]).
    loss: the objective, "xent" (softmax cross-entropy, default) or
      "logit_margin" (max_{j != y} z_j - z_y); see `attack_objective`.

  Returns:
    The adversarial inputs, same shape and dtype as ``x``.
  """
  epsilon = argument_checks.check_nonnegative("epsilon", epsilon)
  loss = check_attack_loss(loss)
  x, labels = _validated(model, x, labels, clip_min, clip_max)
  return fgsm_graph(
      model,
      x,
      labels,
      tf.constant(epsilon, x.dtype),
      tf.constant(clip_min, x.dtype),
      tf.constant(clip_max, x.dtype),
      loss,
  )


def default_step_size(epsilon, steps):
  """alpha = 2.5 * epsilon / steps (Madry et al. 2018): the steps can cross the ball."""
  return 2.5 * epsilon / steps


def pgd(
    model,
    x,
    labels,
    epsilon,
    norm=np.inf,
    steps=10,
    step_size=None,
    random_start=True,
    seed=DEFAULT_SEED,
    clip_min=0.0,
    clip_max=1.0,
    loss=XENT,
):
  """Projected gradient descent on the loss in the l_inf or l_2 ball (Madry et al. 2018).

      x_0 = clip(x + u), u uniform in the ball (``random_start``) or 0
      x_{t+1} = clip(x + P_eps(x_t + alpha * d_t - x)),
      d_t = sign(g_t) (l_inf) or g_t / ||g_t||_2 (l_2), g_t = grad_x L(x_t, y)

  An example is not updated any more once misclassified, so success never decreases
  with ``steps`` for a fixed ``step_size`` and ``seed``.

  Args:
    model: a Keras model returning [batch, classes] logits.
    x: [batch, ...] float inputs inside [clip_min, clip_max].
    labels: [batch] integer labels.
    epsilon: radius of the ball, >= 0, in the input's units.
    norm: 2 or np.inf.
    steps: number of gradient steps, >= 1.
    step_size: alpha, >= 0; default 2.5 * epsilon / steps.
    random_start: start from a uniform random point of the ball.
    seed: a pair of integers, the stateless seed of the random start.
    clip_min, clip_max: the data range.
    loss: the objective L, "xent" (default) or "logit_margin" (`attack_objective`).

  Returns:
    The adversarial inputs: ||x' - x||_p <= epsilon and x' in [clip_min, clip_max].
  """
  epsilon = argument_checks.check_nonnegative("epsilon", epsilon)
  check_attack_norm(norm)
  loss = check_attack_loss(loss)
  steps = argument_checks.check_steps(steps)
  step_size = argument_checks.check_nonnegative(
      "step_size", default_step_size(epsilon, steps) if step_size is None else step_size
  )
  x, labels = _validated(model, x, labels, clip_min, clip_max)
  return pgd_graph(
      model,
      x,
      labels,
      tf.constant(epsilon, x.dtype),
      tf.constant(step_size, x.dtype),
      tf.constant(steps),
      norm,
      bool(random_start),
      tf.constant(seed, tf.int32, shape=[2]),
      tf.constant(clip_min, x.dtype),
      tf.constant(clip_max, x.dtype),
      loss,
  )


def iterative_fgsm(
    model,
    x,
    labels,
    epsilon,
    steps=10,
    step_size=None,
    clip_min=0.0,
    clip_max=1.0,
    loss=XENT,
):
  """Iterative FGSM / BIM (Kurakin et al. 2016): l_inf PGD from x, no random start.

      x_0 = x,  x_{t+1} = clip(x + clip_eps(x_t + alpha * sign(grad_x L(x_t, y)) - x))

  Arguments as `pgd` (step_size default 2.5 * epsilon / steps; ``loss`` "xent" or
  "logit_margin").
  """
  return pgd(
      model,
      x,
      labels,
      epsilon,
      norm=np.inf,
      steps=steps,
      step_size=step_size,
      random_start=False,
      clip_min=clip_min,
      clip_max=clip_max,
      loss=loss,
  )


@tf.function(reduce_retracing=True)
def zero_gradient_graph(model, x, labels, threshold, loss=XENT):
  """[batch] bool, `gradient_is_zero` of grad_x L without validation.

  Computed in a graph like the attacks, so it sees the gradients they see.
  """
  _, gradient = loss_gradient(model, x, labels, loss)
  return gradient_is_zero(gradient, threshold)


def zero_gradient_fraction(
    model, x, labels, loss=XENT, threshold=ZERO_GRADIENT_THRESHOLD
):
  """Fraction of examples whose input gradient of the attack objective vanishes.

      mean_i [ max_m |(grad_x L(x_i, y_i))_m| <= threshold ]

  A measure of gradient masking: on a model whose softmax saturates in float32 the
  cross-entropy's gradient underflows to exactly 0 and the gradient attacks with
  ``loss="xent"`` leave those examples unchanged, while the logit margin's gradient
  (``loss="logit_margin"``) stays nonzero.

  Args:
    model: a Keras model returning [batch, classes] logits.
    x: [batch, ...] float inputs.
    labels: [batch] integer labels.
    loss: the objective L, "xent" (default) or "logit_margin".
    threshold: gradients with every |entry| <= threshold count as zero, >= 0
      (default 1e-30; 0 counts only exact zeros).

  Returns:
    A float in [0, 1].
  """
  loss = check_attack_loss(loss)
  threshold = argument_checks.check_nonnegative("threshold", threshold)
  x, labels = argument_checks.float_inputs_and_labels(model, x, labels)
  zero = zero_gradient_graph(model, x, labels, tf.constant(threshold, x.dtype), loss)
  return float(np.mean(zero.numpy()))


def gaussian_noise(x, sigma, seed=DEFAULT_SEED, clip_min=0.0, clip_max=1.0):
  """x' = clip(x + sigma * n), n ~ N(0, I) drawn with the stateless ``seed``.

  Args:
    x: [batch, ...] float inputs inside [clip_min, clip_max].
    sigma: standard deviation, >= 0, in the input's units.
    seed: a pair of integers.
    clip_min, clip_max: the data range.
  """
  sigma = argument_checks.check_nonnegative("sigma", sigma)
  x = tf.convert_to_tensor(x)
  argument_checks.check_data_range(x, clip_min, clip_max)
  noise = tf.random.stateless_normal(
      tf.shape(x), tf.constant(seed, tf.int32, [2]), dtype=x.dtype
  )
  return tf.clip_by_value(x + sigma * noise, clip_min, clip_max)


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------

ATTACKS = {"fgsm": fgsm, "iterative_fgsm": iterative_fgsm, "pgd": pgd}


def perturb(attack, model, x, labels, seed, **kwargs):
  """Applies ``attack`` ("clean", "gaussian" or a name of `ATTACKS`) to one batch.

  ``kwargs`` are the attack's (``epsilon`` and optionally ``loss`` for the attacks,
  ``sigma`` for "gaussian").
  """
  if attack == "clean":
    if kwargs:
      raise ValueError(
          f"The clean data take no attack arguments; got {sorted(kwargs)}."
      )
    return tf.convert_to_tensor(x)
  if attack == "gaussian":
    return gaussian_noise(x, seed=seed, **kwargs)
  if attack not in ATTACKS:
    raise ValueError(
        f"Unknown attack {attack!r}; expected 'clean', 'gaussian' or one of "
        f"{sorted(ATTACKS)}."
    )
  if attack == "pgd":
    kwargs.setdefault("seed", seed)
  return ATTACKS[attack](model, x, labels, **kwargs)


def robust_accuracy(
    model, dataset, attack="clean", source_model=None, seed=0, **kwargs
):
  """Accuracy of ``model`` on ``dataset`` perturbed by ``attack``.

  White-box by default; with ``source_model`` the adversarial examples are crafted on
  that model and transferred to ``model`` (black-box, as Elsayed et al. 2018 with a
  cross-entropy source model).

  Args:
    model: a Keras model returning logits.
    dataset: an iterable of ``(x, labels)`` batches (e.g. a `tf.data.Dataset`).
    attack: "clean", "gaussian", "fgsm", "iterative_fgsm" or "pgd".
    source_model: the model the attack's gradients are taken on (default ``model``).
    seed: integer; batch i uses the stateless seed (seed, i) for its randomness.
    **kwargs: the attack's arguments (``epsilon``, ``sigma``, ``steps``, ...;
      ``loss="logit_margin"`` for the gradient attacks' logit-margin objective,
      which gradient masking by a saturated softmax cannot weaken).

  Returns:
    The fraction of examples classified correctly, a float.
  """
  source_model = model if source_model is None else source_model
  correct = total = 0
  for i, (x, labels) in enumerate(dataset):
    x_attacked = perturb(attack, source_model, x, labels, (seed, i), **kwargs)
    predictions = np.argmax(model(x_attacked, training=False), axis=1)
    correct += int(np.sum(predictions == np.asarray(labels)))
    total += len(predictions)
  if total == 0:
    raise ValueError("dataset is empty.")
  return correct / total
