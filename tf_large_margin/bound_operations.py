"""Boxes, perturbation sets and the network's elementary maps, with their bounds.

A network is read (`tf_large_margin.bound_network`) as a chain of `Operation`s
h_{i+1} = f_i(h_i), each a map of a batch [batch, *in_shape] in float64. Each one
knows two rules, used by `tf_large_margin.bound_propagation`:

* Interval (IBP): bounds of f(h) for h in a box [l, u] = [c - r, c + r],

      affine h -> W h + b:   c' = W c + b,  r' = |W| r
      monotone h -> f(h):    [f(l), f(u)]  (ReLU, max-pooling)

* Backward (CROWN, Zhang et al., "Efficient Neural Network Robustness Certification
  with General Activation Functions", NeurIPS 2018): a linear lower bound a . h_{i+1}
  + c of the objective becomes one in h_i, a . f(h) + c >= a' . h + c' on the box,

      affine:  a . (W h + b)  =  (W^T a) . h + a . b
      ReLU, pre-activation bounds l < 0 < u (unstable):
               alpha z <= relu(z) <= s (z - l),  s = u / (u - l),
               alpha = 1 if u >= -l else 0  (the adaptive lower slope),
               a . relu(z) >= (a+ alpha + a- s) . z - a- . s l
      (stable units are exact: identity if l >= 0, zero if u <= 0)
      max-pooling y = max_{i in window} x_i:
               x_k <= y <= max_{i in window} u_i,  k = argmax_i l_i,

  concretised at the input by `InputSet.min_linear`:

      min_{x' in box [l, u]} a . x'  = a+ . l + a- . u
      min_{||x' - x||_2 <= eps} a . x' = a . x - eps ||a||_2.

Backward coefficients a are [batch, K, *shape]: K rows (objectives) per example.
"""

import tensorflow as tf

from tf_large_margin import norm_balls

DTYPE = tf.float64


# ---------------------------------------------------------------------------
# Boxes, balls and helpers
# ---------------------------------------------------------------------------


class Box:
  """Elementwise bounds lower <= h <= upper of a batch of activations."""

  def __init__(self, lower, upper):
    self.lower = lower
    self.upper = upper

  def intersect(self, other):
    """[max(l, l'), min(u, u')]: the bounds both boxes prove."""
    return Box(tf.maximum(self.lower, other.lower), tf.minimum(self.upper, other.upper))


def sum_units(a):
  """sum over the unit axes of backward coefficients [batch, K, ...] -> [batch, K]."""
  return tf.reduce_sum(a, axis=list(range(2, a.shape.rank)))


def vector_jacobian(function, a, at):
  """a^T J_f(at) per row: [batch, K, *out] -> [batch, K, *in].

  ``at`` is the point, one row per example and row of ``a`` ([batch K, *in]); for
  a linear ``function`` this is the transpose W^T a at any point.
  """
  batch, rows = a.shape[0], a.shape[1]
  with tf.GradientTape() as tape:
    tape.watch(at)
    out = function(at)
  flat = tf.reshape(a, [batch * rows] + list(out.shape[1:]))
  grad = tape.gradient(out, at, output_gradients=flat)
  return tf.reshape(grad, [batch, rows] + list(at.shape[1:]))


def ball_box(x, epsilon, clip_min, clip_max):
  """The box [x - eps, x + eps] clipped to [clip_min, clip_max]: the l_inf ball in
  the box exactly, a box containing the l_2 ball in the box."""
  radius = norm_balls.expand_to(epsilon, x)
  lower, upper = x - radius, x + radius
  if clip_min is not None:
    lower = tf.maximum(lower, clip_min)
  if clip_max is not None:
    upper = tf.minimum(upper, clip_max)
  return Box(lower, upper)


class InputSet:
  """The perturbation set B_p(x, eps) intersected with the box, per example."""

  def __init__(self, x, epsilon, norm, clip_min=None, clip_max=None):
    self.x = x
    self.epsilon = epsilon
    self.norm = norm
    self.box = ball_box(x, epsilon, clip_min, clip_max)

  def min_linear(self, a):
    """A lower bound of min_{x'} a . x' per row of a [batch, K, *input] -> [batch, K].

    box:   a+ . l + a- . u   (exact for l_inf)
    l_2:   max(a . x - eps ||a||_2, the box bound)
    """
    box = sum_units(
        tf.nn.relu(a) * self.box.lower[:, None]
        + tf.minimum(a, 0.0) * self.box.upper[:, None]
    )
    if self.norm != 2:
      return box
    norms = tf.sqrt(sum_units(tf.square(a)))
    ball = sum_units(a * self.x[:, None]) - self.epsilon[:, None] * norms
    return tf.maximum(box, ball)


# ---------------------------------------------------------------------------
# Operations: one per elementary map of the network, in float64
# ---------------------------------------------------------------------------


class Operation:
  """h_out = f(h_in) on [batch, *in_shape]; ``in_shape``/``out_shape`` are set by
  `tf_large_margin.bound_network.network` (without the batch axis)."""

  nonlinear = False
  isometry = False
  in_shape = None
  out_shape = None

  def apply(self, h):
    raise NotImplementedError

  def interval(self, box):
    """Bounds of f(h) for h in ``box``."""
    raise NotImplementedError

  def backward(self, a, c, box):
    """Lower-bound backward step: a . f(h) + c >= a' . h + c' for h in ``box``."""
    raise NotImplementedError

  def row_norms(self):
    """||W_o||_2 per output unit of an affine map (broadcastable to the output), or
    None when not available."""
    return None


class Affine(Operation):
  """h -> W h + b; subclasses define W h (`linear`), |W| r and, optionally, W^T a."""

  bias = None

  def linear(self, h):
    raise NotImplementedError

  def abs_linear(self, r):
    """|W| r, for a radius r >= 0."""
    raise NotImplementedError

  def transpose(self, a):
    """W^T a per row of a [batch, K, *out] -> [batch, K, *in]."""
    zeros = tf.zeros([a.shape[0] * a.shape[1]] + list(self.in_shape), DTYPE)
    return vector_jacobian(self.linear, a, zeros)

  def apply(self, h):
    out = self.linear(h)
    return out if self.bias is None else out + self.bias

  def interval(self, box):
    """[W c + b - |W| r, W c + b + |W| r], c = (l + u) / 2, r = (u - l) / 2."""
    center = self.apply((box.lower + box.upper) / 2.0)
    radius = self.abs_linear((box.upper - box.lower) / 2.0)
    return Box(center - radius, center + radius)

  def bias_term(self, a):
    """a . b per row: [batch, K]."""
    if self.bias is None:
      return tf.zeros(a.shape[:2], DTYPE)
    return sum_units(a * self.bias)

  def backward(self, a, c, box):
    """a . (W h + b) + c = (W^T a) . h + (a . b + c)."""
    return self.transpose(a), c + self.bias_term(a)


class Dense(Affine):
  """h -> h W + b on the last axis (keras.layers.Dense)."""

  def __init__(self, kernel, bias):
    self.kernel = tf.constant(kernel, DTYPE)
    self.bias = None if bias is None else tf.constant(bias, DTYPE)

  def linear(self, h):
    return tf.tensordot(h, self.kernel, [[h.shape.rank - 1], [0]])

  def abs_linear(self, r):
    return tf.tensordot(r, tf.abs(self.kernel), [[r.shape.rank - 1], [0]])

  def transpose(self, a):
    return tf.tensordot(a, self.kernel, [[a.shape.rank - 1], [1]])

  def row_norms(self):
    return tf.sqrt(tf.reduce_sum(tf.square(self.kernel), axis=0))


class MarginDense(Affine):
  """The margin logits of one example each: m_j = (W_y - W_j) h + b_y - b_j.

  ``kernel`` is [batch, in, classes] and ``bias`` [batch, classes], one example's
  difference rows each; column y is zero.
  """

  def __init__(self, kernel, bias):
    self.kernel = kernel
    self.margin_bias = bias

  def linear(self, h):
    return tf.einsum("bi,bic->bc", h, self.kernel)

  def apply(self, h):
    return self.linear(h) + self.margin_bias

  def abs_linear(self, r):
    return tf.einsum("bi,bic->bc", r, tf.abs(self.kernel))

  def transpose(self, a):
    return tf.einsum("bkc,bic->bki", a, self.kernel)

  def bias_term(self, a):
    return tf.einsum("bkc,bc->bk", a, self.margin_bias)

  def row_norms(self):
    return tf.sqrt(tf.reduce_sum(tf.square(self.kernel), axis=1))


def margin_operation(last, labels, num_classes):
  """The map from the logits' input to the margin logits z_y - z_j.

  A last Dense layer on [batch, features] is folded into its difference rows,

      W'_j = W_y - W_j,  b'_j = b_y - b_j,

  (so IBP bounds each margin as one affine map); otherwise the returned map takes
  the logits themselves (W = e_y 1^T - I) and is appended after ``last``.

  Returns:
    ``(operation, folded)``: the `MarginDense` and whether it replaces ``last``.
  """
  if isinstance(last, Dense) and len(last.in_shape) == 1:
    kernel = tf.gather(last.kernel, labels, axis=1)  # [in, batch]
    kernel = tf.transpose(kernel)[:, :, None] - last.kernel[None]
    bias = last.bias if last.bias is not None else tf.zeros([num_classes], DTYPE)
    bias = tf.gather(bias, labels)[:, None] - bias[None]
    operation, folded = MarginDense(kernel, bias), True
  else:
    one_hot = tf.one_hot(labels, num_classes, dtype=DTYPE)  # [batch, classes]
    kernel = one_hot[:, :, None] - tf.eye(num_classes, dtype=DTYPE)[None]
    operation = MarginDense(kernel, tf.zeros([labels.shape[0], num_classes], DTYPE))
    folded = False
  operation.in_shape = last.in_shape if folded else last.out_shape
  operation.out_shape = (num_classes,)
  return operation, folded


class Convolution(Affine):
  """keras.layers.Conv2D (channels_last): h -> conv(h, K) + b."""

  def __init__(self, kernel, bias, strides, padding, dilations):
    self.kernel = tf.constant(kernel, DTYPE)
    self.bias = None if bias is None else tf.constant(bias, DTYPE)
    self.strides = strides
    self.padding = padding.upper()
    self.dilations = dilations

  def convolve(self, h, kernel):
    return tf.nn.convolution(
        h, kernel, strides=self.strides, padding=self.padding, dilations=self.dilations
    )

  def linear(self, h):
    return self.convolve(h, self.kernel)

  def abs_linear(self, r):
    return self.convolve(r, tf.abs(self.kernel))

  def row_norms(self):
    """sqrt(conv(1, K^2)): each output's squared weights summed over the inputs it
    sees (zero padding drops the weights outside the image)."""
    ones = tf.ones([1] + list(self.in_shape), DTYPE)
    return tf.sqrt(self.convolve(ones, tf.square(self.kernel)))


class Scale(Affine):
  """Inference-mode batch normalisation, per channel along ``axis``:

  h -> gamma (h - mean) / sqrt(var + eps) + beta = s h + t,
  s = gamma / sqrt(var + eps),  t = beta - s mean.
  """

  def __init__(self, scale, shift):
    self.scale = tf.constant(scale, DTYPE)
    self.bias = tf.constant(shift, DTYPE)

  def linear(self, h):
    return h * self.scale

  def abs_linear(self, r):
    return r * tf.abs(self.scale)

  def transpose(self, a):
    return a * self.scale

  def row_norms(self):
    return tf.abs(self.scale)


class Reshape(Affine):
  """Flatten / Reshape to ``target`` (-1 allowed): a permutation of the units, so an
  l_2 ball stays a ball."""

  isometry = True

  def __init__(self, target=(-1,)):
    self.target = tuple(target)

  def linear(self, h):
    return tf.reshape(h, [tf.shape(h)[0]] + list(self.target))

  def abs_linear(self, r):
    return self.linear(r)

  def transpose(self, a):
    return tf.reshape(a, list(a.shape[:2]) + list(self.in_shape))


class ReLU(Operation):
  """relu(h) = max(h, 0)."""

  nonlinear = True

  def apply(self, h):
    return tf.nn.relu(h)

  def interval(self, box):
    return Box(tf.nn.relu(box.lower), tf.nn.relu(box.upper))

  def backward(self, a, c, box):
    """The CROWN relaxation with the adaptive lower slope (module docstring)."""
    lower, upper = box.lower[:, None], box.upper[:, None]
    active = tf.cast(lower >= 0.0, DTYPE)
    unstable = (lower < 0.0) & (upper > 0.0)
    width = tf.where(unstable, upper - lower, tf.ones_like(upper))
    upper_slope = tf.where(unstable, upper / width, active)
    lower_slope = tf.where(unstable, tf.cast(upper >= -lower, DTYPE), active)
    intercept = tf.where(unstable, -upper_slope * lower, tf.zeros_like(lower))
    negative = tf.minimum(a, 0.0)
    new_a = tf.nn.relu(a) * lower_slope + negative * upper_slope
    return new_a, c + sum_units(negative * intercept)


class Pooling(Operation):
  """A 2D pooling (channels_last) over windows of ``pool_size`` moved by ``strides``
  with ``padding``; subclasses set ``pool`` (tf.nn.avg_pool2d or tf.nn.max_pool2d)."""

  pool = None

  def __init__(self, pool_size, strides, padding):
    self.pool_size = pool_size
    self.strides = strides
    self.padding = padding.upper()

  def pooled(self, h):
    """The pooling of each window of ``h``."""
    return self.pool(h, self.pool_size, self.strides, self.padding)


class AveragePooling(Pooling, Affine):
  """keras.layers.AveragePooling2D: the mean of each window, a linear map with
  nonnegative weights, so |W| r = W r."""

  pool = staticmethod(tf.nn.avg_pool2d)

  def linear(self, h):
    return self.pooled(h)

  def abs_linear(self, r):
    return self.pooled(r)


class MaxPooling(Pooling):
  """keras.layers.MaxPooling2D: y = max of each window."""

  nonlinear = True
  pool = staticmethod(tf.nn.max_pool2d)

  def apply(self, h):
    return self.pooled(h)

  def interval(self, box):
    return Box(self.apply(box.lower), self.apply(box.upper))

  def backward(self, a, c, box):
    """x_k <= y <= max_window u, k = argmax_window l: a+ selects x_k (the gradient
    of max-pooling at l routes it there), a- takes the constant upper bound."""
    negative = tf.minimum(a, 0.0)
    c = c + sum_units(negative * self.apply(box.upper)[:, None])
    at = tf.repeat(box.lower, a.shape[1], axis=0)
    return vector_jacobian(self.apply, tf.nn.relu(a), at), c
