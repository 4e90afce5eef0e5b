"""The large-margin loss of Elsayed et al. 2018 (Eq. 10), with the original's semantics.

Elsayed, Krishnan, Mobahi, Regan, Bengio, "Large Margin Deep Networks for
Classification", NeurIPS 2018. For a layer h of the network, softmax probabilities p,
label y and another class i, the first-order distance of an example to the decision
boundary between y and i, measured in the l_p norm at h, is

    d_i = (p_y - p_i) / (epsilon + || grad_h p_y - grad_h p_i ||_q),   1/p + 1/q = 1.

The loss penalises distances that fall short of gamma, clipped from below at
gamma * (1 - alpha_factor):

    loss_i = relu(gamma - max(d_i, gamma * (1 - alpha_factor))) - gamma,

summed over the top-k competing classes i (or only the worst of them), averaged over
the batch and over the chosen layers. This module mirrors `large_margin()` of the
original TF1 code: same arguments, same defaults, same value (including the constant
``- gamma``) and the same gradient.

How the gradients are computed. grad_h (p_y - p_i) is a vector-Jacobian product of the
logits with the cotangent c_i = d(p_y - p_i)/d logits, which is analytic (softmax
Jacobian: J v = p * v - p (p . v)). One backward pass per competing class therefore
yields the gradients at *all* layers together; with ``use_approximation`` (the
stop-gradient on the denominator) that pass is not recorded for differentiation.

Beyond the paper, ``score="logits"`` measures the same first-order distance on the
logits z instead of the probabilities, d_i = (z_y - z_i) / (epsilon +
|| grad_h z_y - grad_h z_i ||_q) (`tf_large_margin.margin_scores`).

Backends. The gradients at layers come from a `tf.GradientTape` (or `tf.gradients`),
or from a given vector-Jacobian product ``vjp`` (under JAX, `jax.vjp` of a perturbed
forward pass: `tf_large_margin.perturbed_forward`); `margin_distances`,
`large_margin_per_example` and `large_margin` need one of them. Everything else
(the norms, the checks, `distances`, and `logit_margin_per_example`, Eq. 10 at the
logits with the analytic cotangent) is written with `keras.ops` and runs under any
Keras backend.
"""

import contextlib

import keras
from keras import ops
import numpy as np

from tf_large_margin import margin_penalty
from tf_large_margin import margin_scores
from tf_large_margin.labels import working_dtype

# Dual norm q of the distance norm p (1/p + 1/q = 1).
DUAL_NORMS = {1: np.inf, 2: 2, np.inf: 1}


def check_dist_norm(dist_norm):
  """The distance norm as 1, 2 or np.inf; raises ValueError for anything else.

  Accepts the numbers 1, 2 and infinity (np.inf, float("inf"), also as numpy
  scalars) and the string "inf" (the example scripts' flag value). Every public
  function and class taking ``dist_norm`` goes through this.
  """
  if isinstance(dist_norm, str) and dist_norm.strip().lower() == "inf":
    return np.inf
  if not isinstance(dist_norm, bool) and isinstance(
      dist_norm, (int, float, np.integer, np.floating)
  ):
    if dist_norm == np.inf:
      return np.inf
    if dist_norm in (1, 2):
      return int(dist_norm)
  raise ValueError(f'dist_norm must be 1, 2 or np.inf (or "inf"); got {dist_norm!r}.')


def dual_norm(dist_norm):
  """Returns q, the dual of the distance norm ``dist_norm`` (`check_dist_norm`)."""
  return DUAL_NORMS[check_dist_norm(dist_norm)]


def flat_norm(x, ord):  # pylint: disable=redefined-builtin
  """Norm of order ``ord`` in {1, 2, inf} of each example of ``x``, flattened.

  Args:
    x: tensor of shape [batch, ...].
    ord: 1, 2 or np.inf.

  Returns:
    A [batch] tensor. Its gradient is finite everywhere: for ord 2 the subgradient
    at x = 0 is 0 (`tf.norm`'s gradient x / ||x|| is 0 / 0 = NaN there, e.g. the
    margin's denominator with ``use_approximation=False`` where the softmax saturates).
  """
  x = ops.reshape(x, (ops.shape(x)[0], -1))
  if ord == 1:
    return ops.sum(ops.abs(x), axis=1)
  if ord == 2:
    return safe_norm(x, axis=1)
  # initial: an empty batch stays empty (keras.ops.max raises in eager TF).
  return ops.max(ops.abs(x), axis=1, initial=0.0)


def safe_norm(x, axis, keepdims=False):
  """Euclidean norm ||x||_2 = sqrt(sum x^2) along ``axis``, with gradient 0 at x = 0.

  The value is `tf.norm`'s. Its gradient x / ||x||_2 is 0 / 0 = NaN where x = 0;
  here that subgradient is 0 instead (a `where` on both sides of the square
  root keeps the unused branch finite).
  """
  squares = ops.sum(ops.square(x), axis=axis, keepdims=keepdims)
  positive = squares > 0
  root = ops.sqrt(ops.where(positive, squares, ops.ones_like(squares)))
  return ops.where(positive, root, ops.zeros_like(squares))


def check_top_k(top_k, num_classes=None):
  """Raises ValueError unless ``top_k`` is an integer in [1, num_classes]."""
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
    raise ValueError(f"top_k must be an integer; got {top_k!r}.")
  if num_classes is not None and not 1 <= top_k <= num_classes:
    raise ValueError(f"top_k must be in [1, num_classes={num_classes}]; got {top_k}.")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1; got {top_k}.")


def check_epsilon(epsilon, positive=False):
  """Raises ValueError unless ``epsilon`` is a finite number >= 0 (> 0 if ``positive``).

  The losses need epsilon > 0: with epsilon = 0 the distance (p_y - p_j) / ||grad||
  is +-1 / 0 or 0 / 0 wherever the gradient vanishes (a saturated softmax, dead
  ReLUs, zero inputs), so the loss or its gradient is NaN.
  """
  try:
    value = float(epsilon)
  except (TypeError, ValueError):
    raise ValueError(f"epsilon must be a number; got {epsilon!r}.") from None
  if isinstance(epsilon, bool) or not np.isfinite(value) or value < 0:
    raise ValueError(f"epsilon must be finite and >= 0; got {epsilon!r}.")
  if positive and value == 0:
    raise ValueError(
        "epsilon must be > 0 for the margin loss: with epsilon = 0 the distance "
        "(p_y - p_j) / ||grad (p_y - p_j)|| is +-1 / 0 or 0 / 0 wherever the gradient "
        "vanishes (saturated softmax, dead ReLUs, zero inputs); got 0."
    )


def check_layers_weights(layers_weights, num_layers):
  """The per-layer weights (default all 1), validated: one positive weight per layer."""
  if num_layers == 0:
    raise ValueError("layers_list is empty: give at least one layer tensor.")
  if layers_weights is None:
    return [1.0] * num_layers
  layers_weights = list(layers_weights)
  if len(layers_weights) != num_layers:
    raise ValueError(
        f"layers_weights has {len(layers_weights)} entries but layers_list has "
        f"{num_layers}."
    )
  for i, weight in enumerate(layers_weights):
    if not weight > 0:
      raise ValueError(
          f"layers_weights must be positive; layers_weights[{i}] = {weight!r}."
      )
  return layers_weights


def _check_hyperparameters(top_k, num_classes, dist_norm, num_layers, layers_weights):
  """Validates the arguments shared by the margin functions; returns the weights."""
  dual_norm(dist_norm)
  check_top_k(top_k, num_classes)
  return check_layers_weights(layers_weights, num_layers)


def _check_logits_and_labels(logits, one_hot_labels):
  """Validates dtypes and shapes; returns the logits and the labels as floats.

  The labels take the dtype the margin math runs in: float32 for half-precision
  logits (mixed precision), the logits' own dtype otherwise (float32 or float64).
  """
  logits = ops.convert_to_tensor(logits)
  if not keras.backend.is_float_dtype(logits.dtype):
    dtype = keras.backend.standardize_dtype(logits.dtype)
    raise ValueError(f"logits must be a float tensor; got dtype {dtype}.")
  one_hot_labels = ops.convert_to_tensor(one_hot_labels)
  shape, labels_shape = tuple(logits.shape), tuple(one_hot_labels.shape)
  if len(shape) != 2:
    raise ValueError(f"logits must have shape [batch, classes]; got {shape}.")
  if len(labels_shape) != 2 or any(
      a is not None and b is not None and a != b for a, b in zip(shape, labels_shape)
  ):
    raise ValueError(
        f"logits and one_hot_labels must have the same shape; got {shape} "
        f"and {labels_shape}."
    )
  return logits, ops.cast(one_hot_labels, working_dtype(logits))


def distances(differences, gradients, dual, weight, epsilon, use_approximation):
  """Eq. 10's distances d_j = diff_j / (||g_j||_q / weight + epsilon); [batch, k].

  Args:
    differences: [batch, k] score differences (p_y - p_(j) or z_y - z_(j)).
    gradients: k tensors [batch, ...], g_j the gradient of column j at a layer.
    dual: the norm q of the gradients (`dual_norm`).
    weight: the layer's weight w_l (the norm is divided by it).
    epsilon: added to the norm, >= 0.
    use_approximation: stop the gradient through the norms.
  """
  norms = ops.stack(
      [flat_norm(ops.cast(g, differences.dtype), dual) / weight for g in gradients],
      axis=1,
  )
  if use_approximation:
    norms = ops.stop_gradient(norms)
  denominators = norms + epsilon
  # epsilon = 0 and a vanishing gradient on the boundary (p_y = p_(j)): 0 / 0 is the
  # distance 0, as for any epsilon > 0 (a nonzero difference gives +-inf).
  on_boundary = ops.equal(differences, 0.0) & ops.equal(denominators, 0.0)
  return ops.where(
      on_boundary, ops.zeros_like(differences), differences / denominators
  )


def _vector_jacobian_product(tape, target, sources, cotangent, record):
  """Gradients of <target, cotangent> w.r.t. each source (None if unconnected).

  Unless ``record``, a tape still recording (called inside its ``with`` block)
  does not record the backward pass: `tf.GradientTape.stop_recording` pauses it,
  and raises (RuntimeError, ValueError in older TF) on a tape that is not
  recording, which then has nothing to pause.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  if tape is None:
    return tf.gradients(target, sources, grad_ys=cotangent)
  with contextlib.ExitStack() as stack:
    if not record:
      try:
        stack.enter_context(tape.stop_recording())
      except (RuntimeError, ValueError):
        pass  # Not recording: nothing to pause.
    return tape.gradient(target, sources, output_gradients=cotangent)


def _tape_vjp(tape, logits, layers_list, use_approximation):
  """The vector-Jacobian product of ``logits`` at ``layers_list`` from TensorFlow:
  ``tape``, or `tf.gradients` in a `tf.function`; the backward pass is recorded
  only without the approximation (the stop-gradient on the norms)."""
  if keras.backend.backend() != "tensorflow":
    raise ValueError(
        "margin_distances takes the gradients at layers from TensorFlow (a "
        "tf.GradientTape or tf.gradients) unless vjp= is given: it needs the Keras "
        f'backend "tensorflow"; the backend is "{keras.backend.backend()}". Eq. 10 '
        "at the logits runs on any backend: logit_margin_per_example, "
        "LargeMarginLoss; MarginModel runs under JAX too."
    )
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  if tape is None and tf.executing_eagerly():
    raise ValueError(
        "In eager mode pass tape=: the tf.GradientTape that recorded logits "
        "from layers_list (tf.gradients needs a tf.function)."
    )
  return lambda cotangent: _vector_jacobian_product(
      tape, logits, layers_list, cotangent, record=not use_approximation
  )


def _describe(index, tensor):
  if keras.backend.backend() != "tensorflow":
    return f"layers_list[{index}] of shape {tensor.shape}"
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  name = "" if tf.executing_eagerly() else f" ({tensor.name})"
  return f"layers_list[{index}]{name} of shape {tensor.shape}"


def margin_distances(
    *,
    logits,
    one_hot_labels,
    layers_list,
    top_k=1,
    dist_norm=2,
    epsilon=1e-8,
    use_approximation=True,
    layers_weights=None,
    tape=None,
    score="probabilities",
    vjp=None,
):
  """First-order signed distances to the top-k decision boundaries at each layer.

      d_l[:, j] = (p_y - p_(j)) / (epsilon + || grad_{h_l} (p_y - p_(j)) ||_q / w_l)

  Args:
    logits: [batch, classes] float logits.
    one_hot_labels: [batch, classes] one-hot labels.
    layers_list: tensors h_l that ``logits`` depends on (inputs, hidden activations
      or the logits themselves).
    top_k: number of competing classes, in [1, classes].
    dist_norm: norm p of the distance, 1, 2 or np.inf (or "inf"); the gradient is
      measured in its dual norm q.
    epsilon: added to the gradient norm, >= 0 (with 0, the distance is +-inf where
      the gradient vanishes, and 0 there on the boundary p_y = p_(j)).
    use_approximation: stop the gradient through the norm (denominator).
    layers_weights: positive weights w_l, one per layer (default 1); the gradient
      norm is divided by w_l.
    tape: in eager mode, a `tf.GradientTape` that recorded ``logits`` from
      ``layers_list`` (persistent if top_k > 1, since it is used once per class).
      In a `tf.function` it may be None (`tf.gradients` is used).
    score: "probabilities" (default, the paper): p_y - p_(j) as above; "logits":
      z_y - z_(j) in numerator and gradient (`tf_large_margin.margin_scores`).
    vjp: instead of a tape, under any backend: a function from a cotangent of
      ``logits`` to the gradients of <logits, cotangent> at ``layers_list`` (a
      list, in order), e.g. the pullback of `jax.vjp`.

  Returns:
    ``(differences, distances)``: the [batch, top_k] probability margins
    p_y - p_(j) and a list with one [batch, top_k] distance tensor per layer (float32
    for half-precision logits, the logits' dtype otherwise).
  """
  logits, one_hot_labels = _check_logits_and_labels(logits, one_hot_labels)
  check_epsilon(epsilon)
  layers_list = list(layers_list)
  layers_weights = _check_hyperparameters(
      top_k, logits.shape[1], dist_norm, len(layers_list), layers_weights
  )
  if vjp is None:
    vjp = _tape_vjp(tape, logits, layers_list, use_approximation)
  dual = dual_norm(dist_norm)

  differences, cotangents = margin_scores.score_differences(
      logits, one_hot_labels, top_k, score
  )

  # gradients[l][j]: grad_{h_l} (p_y - p_(j)), one backward pass per class j.
  gradients = [[] for _ in layers_list]
  for j, cotangent in enumerate(cotangents):
    try:
      grads = vjp(ops.cast(cotangent, logits.dtype))
    except RuntimeError as error:
      # tf.GradientTape.gradient raises RuntimeError when a non-persistent tape is
      # used a second time.
      if tape is None or j == 0:
        raise
      raise ValueError(
          f"top_k={top_k} needs one gradient per class: pass a "
          "tf.GradientTape(persistent=True)."
      ) from error
    for l, grad in enumerate(grads):
      if grad is None:
        raise ValueError(
            f"logits do not depend on {_describe(l, layers_list[l])}: its gradient "
            "is None (in eager mode, the tape must watch it and record logits)."
        )
      gradients[l].append(grad)

  layer_distances = [
      distances(differences, grads, dual, weight, epsilon, use_approximation)
      for grads, weight in zip(gradients, layers_weights)
  ]
  return differences, layer_distances


def large_margin_per_example(
    *,
    logits,
    one_hot_labels,
    layers_list,
    gamma=10000.0,
    alpha_factor=2.0,
    top_k=1,
    dist_norm=2,
    epsilon=1e-8,
    use_approximation=True,
    worst_case_loss=True,
    layers_weights=None,
    tape=None,
    shrinkage="clip",
    score="probabilities",
    vjp=None,
):
  """Eq. 10 per example, averaged over layers: a [batch] tensor.

  Its batch mean is `large_margin`; see there for the arguments,
  `margin_penalty.distance_loss` for ``shrinkage`` and `margin_distances` for
  ``vjp`` (the gradients at the layers without a tape).
  """
  check_epsilon(epsilon, positive=True)
  _, layer_distances = margin_distances(
      logits=logits,
      one_hot_labels=one_hot_labels,
      layers_list=layers_list,
      top_k=top_k,
      dist_norm=dist_norm,
      epsilon=epsilon,
      use_approximation=use_approximation,
      layers_weights=layers_weights,
      tape=tape,
      score=score,
      vjp=vjp,
  )
  losses = [
      margin_penalty.distance_loss(d, gamma, alpha_factor, worst_case_loss, shrinkage)
      for d in layer_distances
  ]
  return ops.sum(ops.stack(losses), axis=0) / len(losses)


def large_margin(
    *,
    logits,
    one_hot_labels,
    layers_list,
    gamma=10000.0,
    alpha_factor=2.0,
    top_k=1,
    dist_norm=2,
    epsilon=1e-8,
    use_approximation=True,
    worst_case_loss=True,
    layers_weights=None,
    tape=None,
    score="probabilities",
    vjp=None,
):
  """The large-margin loss of Elsayed et al. 2018 (Eq. 10), as the original code.

  For each layer h_l in ``layers_list`` and each of the ``top_k`` most probable
  classes j other than the label y:

      d = (p_y - p_j) / (epsilon + || grad_{h_l} (p_y - p_j) ||_q / w_l)
      loss = relu(gamma - max(d, gamma * (1 - alpha_factor))) - gamma

  summed over j (or taken at the smallest d if ``worst_case_loss``), averaged over
  the batch, then over the layers. q is the dual of ``dist_norm`` (1 -> inf, 2 -> 2,
  inf -> 1).

  Example (eager; in a `tf.function` ``tape`` may be omitted):

  >>> x = tf.random.normal([8, 4]); w = tf.Variable(tf.random.normal([4, 3]))
  >>> with tf.GradientTape() as weights_tape:
  ...   with tf.GradientTape(persistent=True) as tape:
  ...     tape.watch(x)
  ...     logits = x @ w
  ...   loss = large_margin(logits=logits, one_hot_labels=tf.one_hot([0] * 8, 3),
  ...                       layers_list=[x], gamma=1., tape=tape)
  >>> grad = weights_tape.gradient(loss, w)

  Args:
    logits: [batch, classes] float logits.
    one_hot_labels: [batch, classes] one-hot labels.
    layers_list: tensors the margin is enforced at (the input, hidden activations,
      the logits).
    gamma: desired margin (in the units of each layer).
    alpha_factor: distances below gamma * (1 - alpha_factor) are clipped (no
      gradient).
    top_k: number of competing classes.
    dist_norm: 1, 2 or np.inf (or "inf", `check_dist_norm`).
    epsilon: added to the gradient norm, > 0 (ValueError for 0: `check_epsilon`).
    use_approximation: stop the gradient through the denominator.
    worst_case_loss: only the smallest distance over the top-k classes counts.
    layers_weights: positive per-layer weights (the gradient norm is divided by them).
    tape: eager mode only: the tape that recorded ``logits`` from ``layers_list``
      (persistent if top_k > 1). When the loss is differentiated through
      the norm (``use_approximation=False``), the caller differentiates the loss
      with an outer tape, or with this one if it is persistent and still recording.
    score: "probabilities" (the paper) or "logits" (z_y - z_j replaces p_y - p_j
      in the distance; `tf_large_margin.margin_scores`).
    vjp: instead of ``tape``, under any backend: the gradients at ``layers_list``
      of <logits, cotangent> as a function of the cotangent (`margin_distances`).

  Returns:
    A scalar (float32 for half-precision logits, the logits' dtype otherwise).

  Raises:
    ValueError: for a bad hyper-parameter, mismatched shapes, an empty
      ``layers_list``, non-float logits or a layer the logits do not depend on.
  """
  return ops.mean(
      large_margin_per_example(
          logits=logits,
          one_hot_labels=one_hot_labels,
          layers_list=layers_list,
          gamma=gamma,
          alpha_factor=alpha_factor,
          top_k=top_k,
          dist_norm=dist_norm,
          epsilon=epsilon,
          use_approximation=use_approximation,
          worst_case_loss=worst_case_loss,
          layers_weights=layers_weights,
          tape=tape,
          score=score,
          vjp=vjp,
      )
  )


def logit_margin_per_example(
    *,
    logits,
    one_hot_labels,
    gamma=10000.0,
    alpha_factor=2.0,
    top_k=1,
    dist_norm=2,
    epsilon=1e-8,
    use_approximation=True,
    worst_case_loss=True,
    shrinkage="clip",
    score="probabilities",
):
  """Eq. 10 at the logits only, per example, with no tape: a [batch] tensor.

  The gradient of p_y - p_j w.r.t. the logits is the analytic softmax cotangent
  (see `probability_difference_cotangents`), so this equals `large_margin_per_example`
  with ``layers_list=[logits]`` and works wherever a Keras loss is called, under
  any Keras backend.
  """
  logits, one_hot_labels = _check_logits_and_labels(logits, one_hot_labels)
  _check_hyperparameters(top_k, logits.shape[1], dist_norm, 1, None)
  check_epsilon(epsilon, positive=True)
  differences, cotangents = margin_scores.score_differences(
      logits, one_hot_labels, top_k, score
  )
  logit_distances = distances(
      differences, cotangents, dual_norm(dist_norm), 1.0, epsilon, use_approximation
  )
  return margin_penalty.distance_loss(
      logit_distances, gamma, alpha_factor, worst_case_loss, shrinkage
  )
