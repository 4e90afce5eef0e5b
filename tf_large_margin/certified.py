"""Certified lower bounds on the input-space margin: IBP and CROWN.

The estimates of `tf_large_margin.margin_estimation` (linearised distance, DeepFool) are
heuristics or upper bounds on the distance to the decision boundary. This module
gives lower bounds: a radius r such that no input of the ball

    B_p(x, r) = {x' : ||x' - x||_p <= r}      (p = inf or 2)

(intersected with the box [clip_min, clip_max] if one is given) changes the
prediction y, proved from bounds on the margin logits

    m_j(x') = z_y(x') - z_j(x'),  j != y:     min_j min_{x' in B} m_j(x') > 0.

The bounds of min_{x' in B} m_j(x') from below are those of interval bound
propagation ("ibp"), CROWN-IBP ("crown-ibp") or CROWN ("crown"), computed by
`tf_large_margin.bound_propagation` on the model read as a chain of operations
(`tf_large_margin.bound_network`, which lists the supported layers; the rule of each
operation is in `tf_large_margin.bound_operations`). With ``labels`` the last Dense
layer is replaced by its difference rows (W_y - W_j, b_y - b_j), so the bound on
z_y - z_j is that of one affine map (exact for an affine model) rather than
l_y - u_j. Every CROWN bound is intersected with the IBP bound, so it is never
looser than IBP; full CROWN costs a backward pass per unit that matters (minutes per
bound on the MNIST CNN of `architectures.mnist_cnn`, against a fraction of a second
for IBP and CROWN-IBP).

`interval_bounds` and `crown_bounds` bound the logits or margin logits,
`margin_lower_bound` the worst margin over the ball, and `certified_radius` finds by
bisection the largest radius whose worst margin is certified positive.

All bounds are computed in float64 from the model's weights: they bound the network
in exact arithmetic, not the rounding of a float32 (or float16) forward pass.
"""

import numpy as np
import tensorflow as tf

from tf_large_margin import argument_checks
from tf_large_margin import bound_network
from tf_large_margin import bound_operations
from tf_large_margin import bound_propagation

NORMS = (2, np.inf)
# The bounding methods: "ibp", "crown-ibp", "crown".
METHODS = bound_propagation.METHODS
# The bounds of crown_bounds' intermediate layers: "ibp" (CROWN-IBP) or "crown".
INTERMEDIATE = (bound_propagation.IBP, bound_propagation.CROWN)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def check_norm(norm):
  """Returns ``norm`` after checking it is 2 or np.inf (the supported balls)."""
  if isinstance(norm, bool) or norm not in NORMS:
    raise ValueError(f"norm must be 2 or np.inf for certified bounds; got {norm!r}.")
  return norm


def check_method(method):
  """Returns ``method`` after checking it is "ibp", "crown-ibp" or "crown"."""
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  return method


def check_inference(training):
  """Raises ValueError unless ``training`` is falsy: the bounds are of the
  inference-mode network (batch norm with its moving statistics, no dropout)."""
  if training:
    raise ValueError(
        "Certified bounds hold for the inference-mode network only (batch "
        "normalisation with its moving statistics); got training="
        f"{training!r}."
    )


def check_radii(epsilon, batch):
  """``epsilon``, the radius of the input ball (a scalar or [batch] radii, finite and
  >= 0), as a [batch] tensor. (Not the margin loss's epsilon, see
  `margin_loss.check_epsilon`.)"""
  values = np.asarray(epsilon, np.float64)
  if values.shape not in ((), (batch,)):
    raise ValueError(
        f"epsilon must be a scalar or of shape [batch] = ({batch},); got shape "
        f"{values.shape}."
    )
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError(f"epsilon must be finite and >= 0; got {epsilon!r}.")
  return tf.constant(np.broadcast_to(values, (batch,)), bound_operations.DTYPE)


def _clip_tensor(name, value, x):
  """``value`` (None or broadcastable to ``x``) as a float64 tensor shaped as x."""
  if value is None:
    return None
  try:
    value = np.broadcast_to(np.asarray(value, np.float64), x.shape)
  except ValueError:
    raise ValueError(
        f"{name} must be broadcastable to x's shape {tuple(x.shape)}; got shape "
        f"{np.shape(value)}."
    ) from None
  return tf.constant(value, bound_operations.DTYPE)


def check_clip(x, clip_min, clip_max):
  """``(clip_min, clip_max)`` as tensors shaped as ``x`` (or None), after checking
  clip_min < clip_max and that ``x`` lies in the box."""
  clip_min, clip_max = _clip_tensor("clip_min", clip_min, x), _clip_tensor(
      "clip_max", clip_max, x
  )
  if clip_min is not None and clip_max is not None:
    if not bool(tf.reduce_all(clip_min < clip_max)):
      raise ValueError("clip_min must be < clip_max everywhere.")
  if clip_min is not None and not bool(tf.reduce_all(x >= clip_min)):
    raise ValueError("x must lie in the box: some values are below clip_min.")
  if clip_max is not None and not bool(tf.reduce_all(x <= clip_max)):
    raise ValueError("x must lie in the box: some values are above clip_max.")
  return clip_min, clip_max


class Network:
  """A validated model, inputs and labels, ready for bounds."""

  def __init__(self, model, x, labels=None, training=False):
    check_inference(training)
    x = argument_checks.check_float_inputs(x)
    if labels is not None:
      labels, _ = argument_checks.check_logits_and_labels(model, x, labels)
    elif x.shape.rank is None or x.shape.rank < 2 or x.shape[0] == 0:
      raise ValueError(f"x must be a non-empty batch [batch, ...]; got {x.shape}.")
    self.x = tf.cast(x, bound_operations.DTYPE)
    self.operations = bound_network.network(model, self.x.shape[1:])
    self.logits = bound_network.check_reproduces(model, self.operations, self.x)
    self.num_classes = self.operations[-1].out_shape[0]
    self.labels = labels

  def bounds(self, epsilon, norm, method, clip_min, clip_max, margins, rows=None):
    """Bounds of the logits, or of the margin logits if ``margins``, on the
    examples ``rows`` (all if None; ``epsilon`` [rows] is per row)."""
    x, labels = self.x, self.labels
    if rows is not None:
      x = tf.gather(x, rows)
      labels = None if labels is None else tf.gather(labels, rows)
      clip_min = None if clip_min is None else tf.gather(clip_min, rows)
      clip_max = None if clip_max is None else tf.gather(clip_max, rows)
    operations = self.operations
    if margins:
      operations = bound_propagation.with_margin(operations, labels, self.num_classes)
    inputs = bound_operations.InputSet(x, epsilon, norm, clip_min, clip_max)
    return bound_propagation.output_bounds(operations, inputs, method)

  def worst_margin(self, epsilon, norm, method, clip_min, clip_max, rows=None):
    """min_{j != y} of the lower bounds of z_y - z_j: [rows]."""
    box = self.bounds(epsilon, norm, method, clip_min, clip_max, True, rows)
    labels = self.labels if rows is None else tf.gather(self.labels, rows)
    own = tf.one_hot(labels, self.num_classes, dtype=bound_operations.DTYPE) > 0
    infinity = tf.constant(np.inf, bound_operations.DTYPE)
    return tf.reduce_min(tf.where(own, infinity, box.lower), 1)


def _bounds(model, x, epsilon, norm, labels, method, clip_min, clip_max, training):
  """Shared body of `interval_bounds` and `crown_bounds`."""
  check_norm(norm)
  net = Network(model, x, labels, training)
  epsilon = check_radii(epsilon, net.x.shape[0])
  clip_min, clip_max = check_clip(net.x, clip_min, clip_max)
  box = net.bounds(epsilon, norm, method, clip_min, clip_max, labels is not None)
  return box.lower.numpy(), box.upper.numpy()


def interval_bounds(
    model,
    x,
    epsilon,
    norm=np.inf,
    labels=None,
    clip_min=None,
    clip_max=None,
    training=False,
):
  """IBP bounds of the logits (or margin logits) over an l_inf or l_2 ball.

  For every x' with ||x' - x||_p <= epsilon (and clip_min <= x' <= clip_max):

      lower <= z(x') <= upper,                        labels None
      lower_j <= z_y(x') - z_j(x') <= upper_j,        labels y given

  The margin bounds are those of the last Dense layer's difference rows
  (W_y - W_j) h + b_y - b_j: exact for an affine model. For p = 2 the first
  affine layer is bounded exactly with the dual norm (c +- eps ||W_o||_2).

  Args:
    model: a Sequential or functional Keras model of supported layers (module
      docstring) returning logits.
    x: [batch, ...] float inputs.
    epsilon: the radius, a scalar or [batch], >= 0.
    norm: np.inf or 2.
    labels: None, or [batch] integer labels y for margin bounds.
    clip_min, clip_max: None or bounds of the input box (broadcastable to x);
      x must lie in the box.
    training: must be False: the bounds are of the inference-mode network.

  Returns:
    ``(lower, upper)``: [batch, classes] float64 numpy arrays; with labels, column
    y is 0.
  """
  return _bounds(
      model,
      x,
      epsilon,
      norm,
      labels,
      bound_propagation.IBP,
      clip_min,
      clip_max,
      training,
  )


def crown_bounds(
    model,
    x,
    epsilon,
    norm=np.inf,
    labels=None,
    clip_min=None,
    clip_max=None,
    intermediate=bound_propagation.CROWN,
    training=False,
):
  """CROWN bounds of the logits (or margin logits), intersected with IBP's.

  The arguments and result are those of `interval_bounds`. ``intermediate`` is
  "crown" (the pre-activation bounds of every ReLU and max-pooling layer by CROWN:
  tightest, one backward pass per unit) or "ibp" (by IBP: CROWN-IBP, one backward
  pass). The bounds are never looser than `interval_bounds`.
  """
  if not isinstance(intermediate, str) or intermediate not in INTERMEDIATE:
    raise ValueError(
        f"intermediate must be one of {INTERMEDIATE}; got {intermediate!r}."
    )
  method = (
      bound_propagation.CROWN
      if intermediate == bound_propagation.CROWN
      else bound_propagation.CROWN_IBP
  )
  return _bounds(model, x, epsilon, norm, labels, method, clip_min, clip_max, training)


def margin_lower_bound(
    model,
    x,
    labels,
    epsilon,
    norm=np.inf,
    method=bound_propagation.IBP,
    clip_min=None,
    clip_max=None,
    training=False,
):
  """A lower bound of the worst margin over the ball, per example:

      min_{||x' - x||_p <= eps} min_{j != y} z_y(x') - z_j(x')  >=  returned value

  Positive: the prediction y is certified on the whole ball.

  Args:
    model, x, epsilon, norm, clip_min, clip_max, training: as `interval_bounds`.
    labels: [batch] integer labels.
    method: "ibp", "crown-ibp" or "crown".

  Returns:
    A [batch] float64 numpy array.
  """
  check_norm(norm)
  check_method(method)
  net = Network(model, x, labels, training)
  epsilon = check_radii(epsilon, net.x.shape[0])
  clip_min, clip_max = check_clip(net.x, clip_min, clip_max)
  return net.worst_margin(epsilon, norm, method, clip_min, clip_max).numpy()


def certified_radius(
    model,
    x,
    labels,
    norm=np.inf,
    method=bound_propagation.IBP,
    max_radius=1.0,
    steps=20,
    clip_min=None,
    clip_max=None,
    training=False,
):
  """The largest radius (to bisection tolerance) at which the prediction is certified.

  Bisection on r in [0, max_radius], vectorised over the batch, of the predicate
  `margin_lower_bound`(r) > 0: the returned r satisfies it (or is 0), so

      argmax_k z_k(x') = y  for every x' with ||x' - x||_p <= r (in the box),

  and r is within max_radius / 2^steps of the largest radius the bound certifies
  (for IBP, whose bound decreases with r). Examples the model misclassifies at x get
  0; examples certified at max_radius get max_radius. CROWN's radius is never
  smaller than IBP's.

  Args:
    model, x, labels, norm, clip_min, clip_max, training: as `margin_lower_bound`.
    method: "ibp", "crown-ibp" or "crown".
    max_radius: the upper end of the search, > 0.
    steps: bisection steps, >= 1.

  Returns:
    A [batch] float64 numpy array of radii.
  """
  check_norm(norm)
  check_method(method)
  steps = argument_checks.check_steps(steps)
  max_radius = argument_checks.check_nonnegative("max_radius", max_radius)
  if max_radius == 0:
    raise ValueError("max_radius must be > 0.")
  net = Network(model, x, labels, training)
  clip_min, clip_max = check_clip(net.x, clip_min, clip_max)
  predicted = tf.argmax(net.logits, axis=1, output_type=tf.int32)
  correct = (predicted == net.labels).numpy()

  def certified(radius, rows):
    epsilon = tf.constant(radius, bound_operations.DTYPE)
    rows = tf.constant(rows, tf.int32)
    bound = net.worst_margin(epsilon, norm, method, clip_min, clip_max, rows)
    return bound.numpy() > 0.0

  return bisect_radius(
      certified, np.flatnonzero(correct), len(correct), max_radius, steps
  )


def bisect_radius(certified, rows, batch, max_radius, steps):
  """Per example, the largest r in [0, max_radius] with ``certified`` to ``steps``
  bisection steps, vectorised over the batch.

  ``certified(radii, rows)`` -> [len(rows)] bool says whether the examples ``rows``
  are certified at their ``radii``. An example certified at max_radius gets it; else
  [lower, upper] starts at [0, max_radius] and each step halves it, keeping lower
  certified (or 0) and upper not. Examples not in ``rows`` get 0.

  Returns:
    A [batch] float64 numpy array: the lower ends.
  """
  lower, upper = np.zeros(batch), np.full(batch, max_radius)
  if rows.size:
    top = certified(upper[rows], rows)
    lower[rows[top]] = max_radius
    rows = rows[~top]
  for _ in range(steps):
    if not rows.size:
      break
    middle = (lower[rows] + upper[rows]) / 2.0
    ok = certified(middle, rows)
    lower[rows[ok]], upper[rows[~ok]] = middle[ok], middle[~ok]
  return lower
