"""Per-example margin estimates of a trained model and their summaries.

Three estimates of the distance of an example to the decision boundary:

* First order, at any layer h (Elsayed et al. 2018, Eq. 7/10), computed by
  `tf_large_margin.margin_loss.margin_distances`:

      d_h = (p_y - p_j) / || grad_h (p_y - p_j) ||_q,   1/p + 1/q = 1,

  p the softmax probabilities, j the most probable other class (the smallest d_h over
  the ``top_k`` most probable others). It is negative for misclassified examples. For
  an affine two-class model with logit gap u = z_y - z_j, p_y - p_j = tanh(u / 2), so
  d = sinh(u) / ||w_y - w_j||_q: the exact distance u / ||w_y - w_j||_q to first
  order in u, with the same sign and zero set, and never smaller in magnitude. With
  more classes the gradient of p_y - p_j also involves the other classes' weights,
  so the estimate is not the logit-space distance even near the boundary. Far from
  it the softmax saturates (grad p -> 0) and the estimate grows like sinh(u): a good
  training signal, a poor distance for confidently classified examples.

* Linearised logits, in the input space: the first-order distance of the logit
  differences (the length of DeepFool's first step, below),

      d = min_{k != y} (z_y - z_k) / || grad_x (z_y - z_k) ||_q,

  exact for an affine classifier.

* DeepFool (Moosavi-Dezfooli, Fawzi, Frossard, "DeepFool: a simple and accurate method
  to fool deep neural networks", CVPR 2016, Algorithm 2 with the l_p steps of
  Section 3.3): linearise the logit differences f_k = z_k - z_y at the current point,
  step onto the closest linearised boundary,

      l = argmin_{k != y} |f_k| / ||grad f_k||_q,
      r = |f_l| / ||grad f_l||_q * u_l,  u_l = argmax_{||u||_p <= 1} <grad f_l, u>,

  and repeat until the prediction changes; the returned perturbation is (1 +
  overshoot) times the sum of the steps. It flips the prediction, so its l_p norm is
  an upper bound on the input-space margin. It is exact (up to the overshoot) for an
  affine classifier: one step reaches the closest of the boundaries y/k, at distance
  min_k |(w_y - w_k) x + b_y - b_k| / ||w_y - w_k||_q. The input space is not
  clipped to the data range: the margin is a distance in R^d.

The batch functions take integer labels of shape [batch]; `dataset_margins` runs them
over a data set and `summarize_margins` reduces the result, over correctly classified
examples by default.

Any float model works, including one with half-precision logits (mixed precision,
float16 or bfloat16): the inputs (arrays, lists or tensors of any float dtype, such
as the float16 inputs of a model built with dtype="float16") are cast to float32
(`argument_checks.float32_inputs`), and the linearisation (logits and their
input gradients) is computed in float32, or in float64 for float64 logits
(`working_dtype`). `linearized_margins` returns that dtype; DeepFool's perturbation
and distances have the dtype of the inputs, float32.
"""

import weakref

import numpy as np
import tensorflow as tf

from tf_large_margin import argument_checks
from tf_large_margin import attacks
from tf_large_margin import margin_loss
from tf_large_margin import models
from tf_large_margin import norm_balls
from tf_large_margin.labels import working_dtype

INPUT = models.INPUT
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CORRECT = "correct"
DEEPFOOL = "deepfool"
LINEARIZED = "linearized"
RESERVED = (CORRECT, DEEPFOOL, LINEARIZED)

_ENDPOINTS = weakref.WeakKeyDictionary()


def layer_endpoints(model, layers):
  """A model whose ``margin_endpoints(x)`` gives the logits and the outputs of the
  named ``layers`` ("input" for the input), sharing ``model``'s layers.

  A `MarginTraining` model with these ``margin_layers`` is used as is; otherwise a
  `MarginModel` is wrapped around the functional or Sequential ``model`` (once per
  model and layer names; unknown names raise ValueError).
  """
  layers = tuple(layers)
  if isinstance(model, models.MarginTraining) and tuple(model.margin_layers) == layers:
    return model
  per_model = _ENDPOINTS.setdefault(model, {})
  if layers not in per_model:
    per_model[layers] = models.MarginModel.from_model(model, margin_layers=layers)
  return per_model[layers]


def _check_layers(layers):
  """Returns the layer names as a tuple after checking there is at least one."""
  layers = (layers,) if isinstance(layers, str) else tuple(layers)
  if not layers:
    raise ValueError("layers is empty: name at least one layer or 'input'.")
  return layers


# ---------------------------------------------------------------------------
# First-order margins
# ---------------------------------------------------------------------------


@tf.function(reduce_retracing=True)
def _first_order_graph(endpoints, layers, x, labels, dist_norm, top_k, epsilon):
  """``(distances per layer [batch], correct [batch])`` of one batch."""
  with tf.GradientTape(persistent=top_k > 1) as tape:
    tape.watch(x)
    logits, hidden = endpoints.margin_endpoints(x, training=False)
  hidden = iter(hidden)
  layers_list = [x if name == INPUT else next(hidden) for name in layers]
  _, distances = margin_loss.margin_distances(
      logits=logits,
      one_hot_labels=tf.one_hot(labels, logits.shape[1]),
      layers_list=layers_list,
      top_k=top_k,
      dist_norm=dist_norm,
      epsilon=epsilon,
      tape=tape,
  )
  correct = tf.logical_not(attacks.misclassified(logits, labels))
  return [tf.reduce_min(d, axis=1) for d in distances], correct


def first_order_margins(
    model, x, labels, layers=(INPUT,), dist_norm=2, top_k=1, epsilon=1e-8
):
  """First-order signed distances to the boundary at each layer (Eq. 10's d).

      d_h = min_j (p_y - p_j) / (epsilon + || grad_h (p_y - p_j) ||_q)

  over the ``top_k`` most probable classes j != y, computed by
  `tf_large_margin.margin_loss.margin_distances`.

  Args:
    model: a functional or Sequential Keras model returning logits, or a
      `MarginTraining` model whose ``margin_layers`` are ``layers``.
    x: [batch, ...] float inputs.
    labels: [batch] integer labels.
    layers: names of the layers ("input" for the input).
    dist_norm: 1, 2 or np.inf.
    top_k: number of competing classes (top_k = classes - 1: all of them).
    epsilon: added to the gradient norm.

  Returns:
    ``(margins, correct)``: a dict from layer name to a [batch] numpy array of
    distances (negative where misclassified), and the [batch] boolean array of
    correctly classified examples.
  """
  layers = _check_layers(layers)
  margin_loss.dual_norm(dist_norm)
  x = argument_checks.float32_inputs(x)
  labels, num_classes = argument_checks.check_logits_and_labels(model, x, labels)
  if (
      isinstance(top_k, bool)
      or not isinstance(top_k, (int, np.integer))
      or not (1 <= top_k < num_classes)
  ):
    raise ValueError(
        f"top_k must be an integer in [1, classes - 1 = {num_classes - 1}]; "
        f"got {top_k!r}."
    )
  distances, correct = _first_order_graph(
      layer_endpoints(model, layers), layers, x, labels, dist_norm, top_k, epsilon
  )
  return ({name: d.numpy() for name, d in zip(layers, distances)}, correct.numpy())


# ---------------------------------------------------------------------------
# DeepFool
# ---------------------------------------------------------------------------


# Machine epsilon of the float dtypes logits may have.
_EPSILON = {
    tf.float16: 2.0**-10,
    tf.bfloat16: 2.0**-7,
    tf.float32: 2.0**-23,
    tf.float64: 2.0**-52,
}


def logit_resolution(logits):
  """The rounding error of the logits, per example: eps * max_k |z_k|.

  eps is the machine epsilon of the logits' dtype (2^-10 for float16, 2^-7 for
  bfloat16, 2^-23 for float32, 2^-52 for float64): logit differences smaller than
  this are not resolved. Returns a [batch] tensor in `working_dtype` of ``logits``.
  """
  dtype = working_dtype(logits)
  return _EPSILON[logits.dtype] * tf.reduce_max(tf.abs(tf.cast(logits, dtype)), axis=1)


def _logits_and_class_gradients(model, x):
  """``(logits [B, C], gradients [B, C, ...])``: grad_x z_k for every class k.

  The logits keep the model's dtype (float16 under mixed precision), the gradients
  have the dtype of ``x``; `linearized_boundaries` widens both.
  """
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    logits = model(x, training=False)
    columns = tf.unstack(logits, axis=1)
  gradients = tf.stack([tape.gradient(column, x) for column in columns], axis=1)
  return logits, gradients


def linearized_boundaries(logits, gradients, labels, norm):
  """The decision boundaries y/k of the model linearised at the current point.

      f_k = z_k - z_y,  w_k = grad z_k - grad z_y,
      d_k = -f_k / ||w_k||_q  (signed l_p distance to the linearised boundary y/k)

  Args:
    logits: [batch, classes].
    gradients: [batch, classes, ...], grad_x z_k for every class k.
    labels: [batch] int32 labels y.
    norm: p, 1, 2 or np.inf.

  Returns:
    ``(f, w, d)``: [batch, classes], [batch, classes, ...] and [batch, classes];
    d is inf at k = y and where w_k = 0. All in `working_dtype` of ``logits`` and
    ``gradients`` (float32 for half-precision ones).
  """
  dtype = working_dtype(logits, gradients)
  logits, gradients = tf.cast(logits, dtype), tf.cast(gradients, dtype)
  num_classes = logits.shape[1]
  label_mask = tf.one_hot(labels, num_classes) > 0.0
  f = logits - tf.gather(logits, labels, axis=1, batch_dims=1)[:, None]
  w = gradients - tf.gather(gradients, labels, axis=1, batch_dims=1)[:, None]
  dimension = tf.reduce_prod(tf.shape(w)[2:])
  w_norms = tf.reshape(
      margin_loss.flat_norm(tf.reshape(w, [-1, dimension]), margin_loss.dual_norm(norm)),
      [-1, num_classes],
  )
  unreachable = label_mask | (w_norms == 0.0)
  distances = tf.where(
      unreachable,
      tf.constant(np.inf, dtype),
      -f / tf.where(w_norms == 0.0, tf.ones_like(w_norms), w_norms),
  )
  return f, w, distances


def deepfool_step(logits, gradients, labels, norm, resolution=0.0):
  """One DeepFool step: onto the closest linearised boundary (`linearized_boundaries`).

      l = argmin_{k != y} |d_k|,  r = max(|f_l|, resolution) / ||w_l||_q * u,
      u = argmax_{||u||_p <= 1} <w_l, u>

  so that <w_l, r> = max(|f_l|, resolution): r reaches the linearised boundary y/l
  (r = 0 if no boundary is reachable, w = 0). With ``resolution`` = 0, the length
  is |d_l|. A positive ``resolution`` (`logit_resolution`) is a floor on the logit
  difference to cover: on a tie of rounded logits (f_l = 0 though the prediction
  has not changed, common with half-precision logits) the step still moves the
  point, where it would otherwise stay put until ``max_iter``.

  Args:
    logits, gradients, labels, norm: as `linearized_boundaries`.
    resolution: a scalar or [batch] floor on |f_l|, >= 0.

  Returns:
    r, shaped as one example of ``gradients`` per row ([batch, ...]), in
    `working_dtype` of ``logits`` and ``gradients``.
  """
  _, w, distances = linearized_boundaries(logits, gradients, labels, norm)
  lengths = tf.abs(distances)
  closest = tf.argmin(lengths, axis=1, output_type=tf.int32)
  length = tf.gather(lengths, closest, axis=1, batch_dims=1)
  w_l = tf.gather(w, closest, axis=1, batch_dims=1)
  floor = tf.math.divide_no_nan(
      tf.cast(resolution, w_l.dtype), margin_loss.flat_norm(w_l, margin_loss.dual_norm(norm))
  )
  length = tf.maximum(length, floor)
  length = tf.where(tf.math.is_inf(length), tf.zeros_like(length), length)
  direction = norm_balls.steepest_ascent_direction(w_l, norm)
  return norm_balls.expand_to(length, w_l) * direction


@tf.function(reduce_retracing=True)
def _linearized_graph(model, x, labels, norm):
  """min_k d_k of `linearized_boundaries` at x: [batch]."""
  logits, gradients = _logits_and_class_gradients(model, x)
  _, _, distances = linearized_boundaries(logits, gradients, labels, norm)
  return tf.reduce_min(distances, axis=1)


def linearized_margins(model, x, labels, norm=2):
  """First-order input-space margin on the logits (DeepFool's first step length).

      d = min_{k != y} (z_y - z_k) / || grad_x (z_y - z_k) ||_q

  Exact for an affine classifier; negative where misclassified. Unlike the
  probability-based estimate of Eq. 10 (`first_order_margins`), it does not grow
  without bound as the softmax saturates.

  Args:
    model: a Keras model returning [batch, classes] logits.
    x: [batch, ...] float inputs.
    labels: [batch] integer labels.
    norm: 1, 2 or np.inf.

  Returns:
    A [batch] numpy array: float32, or float64 for a model with float64 logits
    (half-precision logits are widened to float32 before the linearisation).
  """
  margin_loss.dual_norm(norm)
  x = argument_checks.float32_inputs(x)
  labels, _ = argument_checks.check_logits_and_labels(model, x, labels)
  return _linearized_graph(model, x, labels, norm).numpy()


@tf.function(reduce_retracing=True)
def _deepfool_graph(model, x, labels, norm, max_iter, overshoot):
  """DeepFool on one batch: ``(x + (1 + overshoot) r_total, flipped [batch])``."""
  total = tf.zeros_like(x)
  x_adv = x
  for _ in tf.range(max_iter):
    logits, gradients = _logits_and_class_gradients(model, x_adv)
    active = tf.logical_not(attacks.misclassified(logits, labels))
    if not tf.reduce_any(active):
      break
    step = deepfool_step(logits, gradients, labels, norm, logit_resolution(logits))
    step = tf.cast(step, x.dtype)
    total = tf.where(norm_balls.expand_to(active, x), total + step, total)
    x_adv = x + (1.0 + overshoot) * total
  flipped = attacks.misclassified(model(x_adv, training=False), labels)
  return x_adv, flipped


def deepfool(model, x, labels, norm=2, max_iter=50, overshoot=0.02):
  """Multi-class DeepFool (Moosavi-Dezfooli et al. 2016): an upper bound on the margin.

  Args:
    model: a Keras model returning [batch, classes] logits.
    x: [batch, ...] float inputs.
    labels: [batch] integer labels.
    norm: 1, 2 or np.inf, the norm the perturbation is measured in.
    max_iter: maximum number of linearisation steps, >= 1.
    overshoot: the summed steps are scaled by 1 + overshoot, >= 0 (to cross the
      boundary rather than land on it).

  Returns:
    ``(x_adv, distances)``: the perturbed inputs (a float32 tensor) and the [batch]
    float32 numpy array of ||x_adv - x||_p; 0 for examples misclassified from the
    start and inf for those not flipped within ``max_iter`` steps. The steps are
    computed in float32 (float64 for float64 logits), also for half-precision
    logits, and cover at least the logits' rounding error (`logit_resolution`),
    so that a tie of rounded logits does not stall the iteration.
  """
  margin_loss.dual_norm(norm)
  max_iter = argument_checks.check_steps(max_iter, "max_iter")
  overshoot = argument_checks.check_nonnegative("overshoot", overshoot)
  x = argument_checks.float32_inputs(x)
  labels, _ = argument_checks.check_logits_and_labels(model, x, labels)
  x_adv, flipped = _deepfool_graph(
      model, x, labels, norm, tf.constant(max_iter), tf.constant(overshoot)
  )
  distances = margin_loss.flat_norm(x_adv - x, norm).numpy()
  return x_adv, np.where(flipped.numpy(), distances, np.inf)


# ---------------------------------------------------------------------------
# Data sets and summaries
# ---------------------------------------------------------------------------


def dataset_margins(
    model,
    dataset,
    layers=(INPUT,),
    dist_norm=2,
    deepfool_steps=50,
    overshoot=0.02,
    progress=None,
):
  """Margins of every example of ``dataset``.

  Args:
    model: a Keras model returning logits (see `first_order_margins`).
    dataset: an iterable of ``(x, labels)`` batches.
    layers: layer names for the first-order margins.
    dist_norm: 1, 2 or np.inf, for both estimates.
    deepfool_steps: DeepFool's ``max_iter``; 0 skips DeepFool.
    overshoot: DeepFool's overshoot.
    progress: None or a callable ``progress(batch_index)`` called after each batch.

  Returns:
    A dict of [N] numpy arrays: "correct" (bool), one entry per layer name (the
    first-order margins of `first_order_margins`), "linearized"
    (`linearized_margins`) and, unless ``deepfool_steps`` is 0, "deepfool".
  """
  layers = _check_layers(layers)
  if set(layers) & set(RESERVED):
    raise ValueError(f"The names {RESERVED} are reserved; got layers {layers}.")
  parts = {}
  for i, (x, labels) in enumerate(dataset):
    distances, correct = first_order_margins(model, x, labels, layers, dist_norm)
    distances[CORRECT] = correct
    distances[LINEARIZED] = linearized_margins(model, x, labels, dist_norm)
    if deepfool_steps:
      distances[DEEPFOOL] = deepfool(
          model, x, labels, dist_norm, deepfool_steps, overshoot
      )[1]
    for key, values in distances.items():
      parts.setdefault(key, []).append(values)
    if progress is not None:
      progress(i)
  if not parts:
    raise ValueError("dataset is empty.")
  return {key: np.concatenate(values) for key, values in parts.items()}


def summarize(values, quantiles=QUANTILES, thresholds=()):
  """Summary of margins: count, median, quantiles and fraction below thresholds.

  Returns:
    {"count": n, "median": m, "quantiles": {str(q): value}, "fraction_below":
    {str(t): mean(values < t)}}; with no values the statistics are None.
  """
  values = np.asarray(values, np.float64)
  if any(not 0 <= q <= 1 for q in quantiles):
    raise ValueError(f"quantiles must lie in [0, 1]; got {quantiles}.")
  empty = values.size == 0
  return {
      "count": int(values.size),
      "median": None if empty else float(np.median(values)),
      "quantiles": {
          str(q): None if empty else float(np.quantile(values, q)) for q in quantiles
      },
      "fraction_below": {
          str(t): None if empty else float(np.mean(values < t)) for t in thresholds
      },
  }


def summarize_margins(margins, only_correct=True, quantiles=QUANTILES, thresholds=()):
  """`summarize` for each estimate of a `dataset_margins` result.

  Args:
    margins: the dict returned by `dataset_margins`.
    only_correct: summarise only the correctly classified examples (default), whose
      margins are positive; otherwise all examples.
    quantiles, thresholds: as `summarize`.

  Returns:
    A dict from estimate name (layer names, "linearized", "deepfool") to its summary.
  """
  if CORRECT not in margins:
    raise ValueError("margins must be a dataset_margins result (no 'correct' key).")
  keep = margins[CORRECT] if only_correct else np.ones_like(margins[CORRECT])
  return {
      name: summarize(values[keep], quantiles, thresholds)
      for name, values in margins.items()
      if name != CORRECT
  }
