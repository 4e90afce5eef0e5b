"""Certified lower bounds on the input-space margin: IBP and CROWN.

The estimates of `tf_large_margin.margin_estimation` (linearised distance, DeepFool) are
heuristics or upper bounds on the distance to the decision boundary. This module
gives lower bounds: a radius r such that no input of the ball

    B_p(x, r) = {x' : ||x' - x||_p <= r}      (p = inf or 2)

(intersected with the box [clip_min, clip_max] if one is given) changes the
prediction y, proved from bounds on the margin logits

    m_j(x') = z_y(x') - z_j(x'),  j != y:     min_j min_{x' in B} m_j(x') > 0.

Two ways of bounding min_{x' in B} m_j(x') from below:

* Interval bound propagation (IBP; Gowal et al., "On the Effectiveness of Interval
  Bound Propagation for Training Verifiably Robust Models", 2018). A box
  [l, u] = [c - r, c + r] is pushed through each layer:

      affine h -> W h + b:   c' = W c + b,  r' = |W| r
      monotone h -> f(h):    [f(l), f(u)]  (ReLU, max-pooling)

  The l_2 ball is bounded exactly by the first affine layer (the dual norm):
  W_o x' + b_o lies in W_o x + b_o +- eps ||W_o||_2 for every output unit o. With
  ``labels`` the last Dense layer is replaced by its difference rows
  (W_y - W_j, b_y - b_j), so the bound on z_y - z_j is that of one affine map
  (exact for an affine model) rather than l_y - u_j.

* CROWN (Zhang et al., "Efficient Neural Network Robustness Certification with
  General Activation Functions", NeurIPS 2018): a linear lower bound a . h_l + c of
  the objective is propagated backwards from the output to the input,

      affine:  a . (W h + b)  =  (W^T a) . h + a . b
      ReLU, pre-activation bounds l < 0 < u (unstable):
               alpha z <= relu(z) <= s (z - l),  s = u / (u - l),
               alpha = 1 if u >= -l else 0  (the adaptive lower slope),
               a . relu(z) >= (a+ alpha + a- s) . z - a- . s l
      (stable units are exact: identity if l >= 0, zero if u <= 0)
      max-pooling y = max_{i in window} x_i:
               x_k <= y <= max_{i in window} u_i,  k = argmax_i l_i,

  and concretised at the input:

      min_{x' in box [l, u]} a . x'  = a+ . l + a- . u
      min_{||x' - x||_2 <= eps} a . x' = a . x - eps ||a||_2.

  The pre-activation bounds of every ReLU and max-pooling layer are themselves
  CROWN bounds (method "crown": one backward pass per unit that matters, i.e. per
  unstable ReLU input, or per unit of a max-pooling input) or IBP bounds (method
  "crown-ibp", CROWN-IBP of Zhang et al., ICLR 2020: one backward pass from the
  output). Every CROWN bound is intersected with the IBP bound, so it is never
  looser than IBP. Full CROWN costs a backward pass per unit: on the MNIST CNN of
  `architectures.mnist_cnn` (max-pooling after 28x28x32 ReLUs) minutes per bound,
  against a fraction of a second for IBP and CROWN-IBP.

Supported models: Keras functional or Sequential models (nested ones included) that
form a chain of Dense and Conv2D (channels_last, any padding, stride and dilation,
with or without bias, activation relu or linear), ReLU, Activation (relu, linear),
MaxPooling2D, AveragePooling2D, BatchNormalization (with its moving statistics, as in
inference; subclasses such as `BatchNormalizationTF1` included), Flatten, Reshape,
Dropout (the identity at inference) and InputLayer, returning logits. Anything else
raises ValueError naming the layer.

All bounds are computed in float64 from the model's weights: they bound the network
in exact arithmetic, not the rounding of a float32 (or float16) forward pass.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import attacks

NORMS = (2, np.inf)
IBP = "ibp"
CROWN = "crown"
CROWN_IBP = "crown-ibp"
METHODS = (IBP, CROWN_IBP, CROWN)
INTERMEDIATE = (IBP, CROWN)
DTYPE = tf.float64
# Entries of the backward matrices per chunk of units in CROWN's intermediate bounds.
CHUNK_ENTRIES = 2**22
# Relative tolerance of the check that the parsed layers reproduce the model's logits.
_REPRODUCTION_TOLERANCE = {tf.float64: 1e-8, tf.float32: 1e-3}
_HALF_PRECISION_TOLERANCE = 3e-2


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def check_norm(norm):
  """Returns ``norm`` after checking it is 2 or np.inf (the supported balls)."""
  if isinstance(norm, bool) or norm not in NORMS:
    raise ValueError(
        f"norm must be 2 or np.inf for certified bounds; got {norm!r}."
    )
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


def check_epsilon(epsilon, batch):
  """``epsilon`` (a scalar or [batch] radii, finite and >= 0) as a [batch] tensor."""
  values = np.asarray(epsilon, np.float64)
  if values.shape not in ((), (batch,)):
    raise ValueError(
        f"epsilon must be a scalar or of shape [batch] = ({batch},); got shape "
        f"{values.shape}."
    )
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError(f"epsilon must be finite and >= 0; got {epsilon!r}.")
  return tf.constant(np.broadcast_to(values, (batch,)), DTYPE)


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
  return tf.constant(value, DTYPE)


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
    return Box(
        tf.maximum(self.lower, other.lower), tf.minimum(self.upper, other.upper)
    )


def expand_to(per_example, like):
  """A [batch] tensor reshaped to broadcast against ``like`` [batch, ...]."""
  return tf.reshape(per_example, [-1] + [1] * (like.shape.rank - 1))


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
  radius = expand_to(epsilon, x)
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
  `network` (without the batch axis)."""

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


class AveragePooling(Affine):
  """keras.layers.AveragePooling2D: nonnegative weights, so |W| r = W r."""

  def __init__(self, pool_size, strides, padding):
    self.pool_size = pool_size
    self.strides = strides
    self.padding = padding.upper()

  def linear(self, h):
    return tf.nn.avg_pool2d(h, self.pool_size, self.strides, self.padding)

  def abs_linear(self, r):
    return self.linear(r)


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


class MaxPooling(Operation):
  """keras.layers.MaxPooling2D: y = max of each window."""

  nonlinear = True

  def __init__(self, pool_size, strides, padding):
    self.pool_size = pool_size
    self.strides = strides
    self.padding = padding.upper()

  def apply(self, h):
    return tf.nn.max_pool2d(h, self.pool_size, self.strides, self.padding)

  def interval(self, box):
    return Box(self.apply(box.lower), self.apply(box.upper))

  def backward(self, a, c, box):
    """x_k <= y <= max_window u, k = argmax_window l: a+ selects x_k (the gradient
    of max-pooling at l routes it there), a- takes the constant upper bound."""
    negative = tf.minimum(a, 0.0)
    c = c + sum_units(negative * self.apply(box.upper)[:, None])
    at = tf.repeat(box.lower, a.shape[1], axis=0)
    return vector_jacobian(self.apply, tf.nn.relu(a), at), c


# ---------------------------------------------------------------------------
# From Keras layers to operations
# ---------------------------------------------------------------------------

SUPPORTED = (
    "Dense, Conv2D (channels_last, groups=1), ReLU, Activation, MaxPooling2D, "
    "AveragePooling2D, BatchNormalization, Flatten, Reshape, Dropout, InputLayer"
)


def describe(layer):
  """"'name' (Type)" of a layer or operation, for error messages."""
  return f"'{getattr(layer, 'name', '?')}' ({type(layer).__name__})"


def activation_operations(layer, activation):
  """[ReLU()] for relu, [] for linear; ValueError for any other activation."""
  if activation is keras.activations.relu:
    return [ReLU()]
  if activation is None or activation is keras.activations.linear:
    return []
  name = getattr(activation, "__name__", repr(activation))
  raise ValueError(
      f"Layer {describe(layer)} has activation '{name}': certified bounds support "
      "relu and linear activations only (the model must return logits)."
  )


def check_channels_last(layer):
  """ValueError unless the layer's data_format is channels_last."""
  if getattr(layer, "data_format", "channels_last") != "channels_last":
    raise ValueError(
        f"Layer {describe(layer)} has data_format={layer.data_format!r}: certified "
        "bounds support channels_last only."
    )


def numpy(variable):
  """A layer variable as a float64 numpy array."""
  return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def dense_operations(layer):
  """keras.layers.Dense: the affine map, then its activation."""
  if getattr(layer, "quantization_mode", None):
    raise ValueError(f"Layer {describe(layer)} is quantized: not supported.")
  bias = numpy(layer.bias) if layer.use_bias else None
  return [Dense(numpy(layer.kernel), bias)] + activation_operations(
      layer, layer.activation
  )


def conv_operations(layer):
  """keras.layers.Conv2D: the convolution, then its activation."""
  check_channels_last(layer)
  if getattr(layer, "groups", 1) != 1:
    raise ValueError(
        f"Layer {describe(layer)} has groups={layer.groups}: certified bounds "
        "support groups=1 only."
    )
  if getattr(layer, "quantization_mode", None):
    raise ValueError(f"Layer {describe(layer)} is quantized: not supported.")
  bias = numpy(layer.bias) if layer.use_bias else None
  convolution = Convolution(
      numpy(layer.kernel),
      bias,
      tuple(layer.strides),
      layer.padding,
      tuple(layer.dilation_rate),
  )
  return [convolution] + activation_operations(layer, layer.activation)


def relu_operations(layer):
  """keras.layers.ReLU with its default arguments (max(h, 0))."""
  settings = (layer.max_value, float(layer.negative_slope), float(layer.threshold))
  if settings != (None, 0.0, 0.0):
    raise ValueError(
        f"Layer {describe(layer)} has max_value={layer.max_value}, negative_slope="
        f"{layer.negative_slope}, threshold={layer.threshold}: certified bounds "
        "support the plain ReLU max(h, 0) only."
    )
  return [ReLU()]


def pooling_operations(layer, operation):
  """MaxPooling2D / AveragePooling2D as ``operation(pool_size, strides, padding)``."""
  check_channels_last(layer)
  return [operation(tuple(layer.pool_size), tuple(layer.strides), layer.padding)]


def batch_norm_operations(layer, in_shape):
  """Inference-mode batch normalisation as the per-channel `Scale`."""
  if getattr(layer, "renorm", False):
    raise ValueError(
        f"Layer {describe(layer)} uses batch renormalisation: not supported."
    )
  rank = len(in_shape) + 1
  axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
  if not isinstance(axis, int):
    if len(axis) != 1:
      raise ValueError(
          f"Layer {describe(layer)} normalises over axes {axis}: certified bounds "
          "support one channel axis."
      )
    axis = axis[0]
  axis = axis % rank
  if axis == 0:
    raise ValueError(f"Layer {describe(layer)} normalises over the batch axis.")
  channels = in_shape[axis - 1]
  mean, variance = numpy(layer.moving_mean), numpy(layer.moving_variance)
  gamma = numpy(layer.gamma) if layer.scale else np.ones(channels)
  beta = numpy(layer.beta) if layer.center else np.zeros(channels)
  scale = gamma / np.sqrt(variance + layer.epsilon)
  shape = [1] * len(in_shape)
  shape[axis - 1] = channels
  return [Scale(scale.reshape(shape), (beta - scale * mean).reshape(shape))]


def reshape_operations(layer, in_shape):
  """Flatten (in channels_last order) and Reshape: a `Reshape`."""
  if isinstance(layer, keras.layers.Flatten):
    if len(in_shape) > 1:
      check_channels_last(layer)
    return [Reshape()]
  return [Reshape(layer.target_shape)]


def layer_operations(layer, in_shape):
  """The operations computing ``layer`` in inference mode; ValueError if it is not
  supported (the message names the layer and its type)."""
  if isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout)):
    return []
  if isinstance(layer, keras.layers.Dense):
    return dense_operations(layer)
  if isinstance(layer, keras.layers.Conv2D):
    return conv_operations(layer)
  if isinstance(layer, keras.layers.ReLU):
    return relu_operations(layer)
  if isinstance(layer, keras.layers.Activation):
    return activation_operations(layer, layer.activation)
  if isinstance(layer, keras.layers.MaxPooling2D):
    return pooling_operations(layer, MaxPooling)
  if isinstance(layer, keras.layers.AveragePooling2D):
    return pooling_operations(layer, AveragePooling)
  if isinstance(layer, keras.layers.BatchNormalization):
    return batch_norm_operations(layer, in_shape)
  if isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
    return reshape_operations(layer, in_shape)
  raise ValueError(
      f"Layer {describe(layer)} is not supported by certified bounds; supported: "
      f"{SUPPORTED}."
  )


def functional_chain(model):
  """The layers of a functional model from input to output, which must be a chain
  (one input, one output, each layer applied to the previous layer's output)."""
  inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
  if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
    raise ValueError(
        f"Model {describe(model)}: certified bounds need a Sequential or functional "
        "model with one input and one output (a subclassed model has no layer graph)."
    )
  chain, tensor = [], outputs[0]
  while True:
    operation, node_index, _ = tensor._keras_history  # pylint: disable=protected-access
    node = operation._inbound_nodes[node_index]  # pylint: disable=protected-access
    if node.is_input:
      return chain[::-1]
    if len(node.input_tensors) != 1:
      raise ValueError(
          f"Layer {describe(operation)} has {len(node.input_tensors)} inputs: "
          "certified bounds support chains of single-input layers only."
      )
    if node.arguments.kwargs.get("training"):
      raise ValueError(
          f"Layer {describe(operation)} is called with training=True in the model: "
          "certified bounds hold for the inference-mode network only."
      )
    chain.append(operation)
    tensor = node.input_tensors[0]


def layer_chain(model):
  """The layers of a Sequential or functional model in order, nested models
  expanded."""
  if isinstance(model, keras.Sequential):
    layers = list(model.layers)
  elif isinstance(model, keras.Model):
    layers = functional_chain(model)
  else:
    raise ValueError(f"model must be a Keras model; got {type(model).__name__}.")
  chain = []
  for layer in layers:
    chain.extend(layer_chain(layer) if isinstance(layer, keras.Model) else [layer])
  return chain


def network(model, input_shape):
  """The operations of ``model`` on inputs [batch, *input_shape], with their
  ``in_shape`` and ``out_shape`` set; the output must be [batch, classes]."""
  operations, shape = [], tuple(input_shape)
  for layer in layer_chain(model):
    for operation in layer_operations(layer, shape):
      operation.in_shape = shape
      out = operation.apply(tf.zeros((1,) + shape, DTYPE))
      operation.out_shape = shape = tuple(out.shape[1:])
      operations.append(operation)
  if len(shape) != 1:
    raise ValueError(
        f"The model must return logits of shape [batch, classes]; the parsed layers "
        f"give [batch, {', '.join(map(str, shape))}]."
    )
  return operations


def forward(operations, x):
  """The network's logits in float64: the operations applied in turn."""
  for operation in operations:
    x = operation.apply(x)
  return x


def check_reproduces(model, operations, x):
  """ValueError unless the parsed operations give the model's inference logits on
  ``x`` (to the model dtype's rounding): catches layers whose behaviour differs from
  the layer type they subclass. The model gets ``x`` as is (a float64 model its
  float64 values), and the tolerance is that of its least precise input or logits
  dtype (a float32 input layer rounds x)."""
  logits = model(x, training=False)
  inputs = getattr(model, "inputs", None) or []
  dtypes = [logits.dtype] + [tf.as_dtype(i.dtype) for i in inputs]
  tolerance = max(
      _REPRODUCTION_TOLERANCE.get(dtype, _HALF_PRECISION_TOLERANCE) for dtype in dtypes
  )
  logits = tf.cast(logits, DTYPE)
  scale = 1.0 + tf.reduce_max(tf.abs(logits), axis=1)
  error = tf.reduce_max(tf.abs(forward(operations, x) - logits), axis=1) / scale
  error = float(tf.reduce_max(error))
  if error > tolerance:
    raise ValueError(
        "The model's layers, read as the supported layer types in inference mode, "
        f"do not reproduce its logits (relative error {error:.3g}): a layer "
        "subclass probably changes its computation."
    )
  return logits


# ---------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------


def ibp_step(operation, box, ball):
  """One layer of IBP: ``(box, ball)`` -> the bounds of the layer's output.

  ``ball`` is (center, eps) while the set is still an l_2 ball (the input, reshaped),
  else None. An affine map of the ball is bounded exactly per output unit,
  W_o c + b_o +- eps ||W_o||_2, and intersected with the interval bound.
  """
  out = operation.interval(box)
  if ball is None:
    return out, None
  center, epsilon = ball
  if operation.isometry:
    return out, (operation.apply(center), epsilon)
  norms = operation.row_norms()
  if norms is None:
    return out, None
  center = operation.apply(center)
  radius = expand_to(epsilon, center) * norms
  return out.intersect(Box(center - radius, center + radius)), None


def ibp_boxes(operations, inputs):
  """IBP bounds of every activation h_0 (the input), ..., h_n (the output)."""
  box = inputs.box
  ball = (inputs.x, inputs.epsilon) if inputs.norm == 2 else None
  boxes = [box]
  for operation in operations:
    box, ball = ibp_step(operation, box, ball)
    boxes.append(box)
  return boxes


def backward_bound(operations, boxes, a, inputs):
  """CROWN: a lower bound of a . h_n per row of a [batch, K, *out] -> [batch, K].

  ``operations`` map h_0 to h_n; ``boxes[i]`` bounds h_i (the input of operation
  i), used by the nonlinear relaxations.
  """
  c = tf.zeros(a.shape[:2], DTYPE)
  for operation, box in zip(operations[::-1], boxes[len(operations) - 1 :: -1]):
    a, c = operation.backward(a, c, box)
  return c + inputs.min_linear(a)


def unit_rows(shape, units, batch):
  """The rows e_u of the identity on the units of ``shape``, u in ``units`` (flat
  indices): [batch, len(units), *shape]."""
  rows = tf.one_hot(units, math.prod(shape), dtype=DTYPE)
  rows = tf.reshape(rows, [1, len(units)] + list(shape))
  return tf.tile(rows, [batch, 1] + [1] * len(shape))


def crown_units(operations, boxes, inputs, units):
  """CROWN bounds of the units ``units`` (flat indices) of h_n = operations(h_0):
  one backward pass per unit and sign, in chunks of units.

  Returns:
    ``(lower, upper)``, each [batch, len(units)].
  """
  shape = operations[-1].out_shape
  batch, count = inputs.x.shape[0], int(units.shape[0])
  widest = max(math.prod(op.in_shape) for op in operations)
  chunk = max(1, CHUNK_ENTRIES // (2 * batch * max(widest, math.prod(shape))))
  lowers, uppers = [], []
  for start in range(0, count, chunk):
    rows = unit_rows(shape, units[start : start + chunk], batch)
    bound = backward_bound(operations, boxes, tf.concat([rows, -rows], 1), inputs)
    lowers.append(bound[:, : rows.shape[1]])
    uppers.append(-bound[:, rows.shape[1] :])
  return tf.concat(lowers, 1), tf.concat(uppers, 1)


def units_to_refine(box, following):
  """Flat indices of the units of ``box`` whose bounds matter to the ``following``
  operations (the rest of the network).

  Before a ReLU, the units unstable (l < 0 < u) in some example: a stable unit's
  relaxation is exact whatever its bounds, unless the ReLU's output bounds feed a
  max-pooling (its relaxation uses them), as does a max-pooling directly: then all.
  """
  lower = tf.reshape(box.lower, [box.lower.shape[0], -1])
  relus = 0
  while relus < len(following) and isinstance(following[relus], ReLU):
    relus += 1
  if not relus or (relus < len(following) and following[relus].nonlinear):
    return tf.range(lower.shape[1])
  upper = tf.reshape(box.upper, [box.upper.shape[0], -1])
  unstable = tf.reduce_any((lower < 0.0) & (upper > 0.0), axis=0)
  return tf.cast(tf.where(unstable)[:, 0], tf.int32)


def refine(box, operations, boxes, inputs, following):
  """``box`` (of h_n = operations(h_0)) intersected with CROWN's bounds of the units
  that matter to the ``following`` operations (`units_to_refine`)."""
  units = units_to_refine(box, following)
  if units.shape[0] == 0:
    return box
  lower, upper = crown_units(operations, boxes, inputs, units)
  index = units[:, None]

  def update(bounds, refined, scatter):
    flat = tf.transpose(tf.reshape(bounds, [bounds.shape[0], -1]))  # [units, batch]
    flat = scatter(flat, index, tf.transpose(refined))
    return tf.reshape(tf.transpose(flat), bounds.shape)

  return Box(
      update(box.lower, lower, tf.tensor_scatter_nd_max),
      update(box.upper, upper, tf.tensor_scatter_nd_min),
  )


def crown_boxes(operations, inputs, intermediate):
  """Bounds of every activation for CROWN: IBP, intersected with CROWN's own bounds
  at the inputs of nonlinear operations when ``intermediate`` is "crown".

  Only the units that matter are refined (`units_to_refine`), and the output of a
  ReLU is not: relu of its input's CROWN bounds already is its CROWN bound.
  """
  box = inputs.box
  ball = (inputs.x, inputs.epsilon) if inputs.norm == 2 else None
  boxes = [box]
  for i, operation in enumerate(operations):
    box, ball = ibp_step(operation, box, ball)
    if (
        intermediate == CROWN
        and i + 1 < len(operations)
        and operations[i + 1].nonlinear
        and not isinstance(operation, ReLU)
    ):
      box = refine(box, operations[: i + 1], boxes, inputs, operations[i + 1 :])
    boxes.append(box)
  return boxes


def output_bounds(operations, inputs, method):
  """Bounds of the network output h_n: IBP, or CROWN intersected with IBP.

  For CROWN, the rows [I; -I] give the lower bounds of h_n and of -h_n.
  """
  if method == IBP:
    return ibp_boxes(operations, inputs)[-1]
  intermediate = CROWN if method == CROWN else IBP
  boxes = crown_boxes(operations, inputs, intermediate)
  size = operations[-1].out_shape[0]
  rows = unit_rows((size,), tf.range(size), inputs.x.shape[0])
  bound = backward_bound(operations, boxes, tf.concat([rows, -rows], 1), inputs)
  return boxes[-1].intersect(Box(bound[:, :size], -bound[:, size:]))


def with_margin(operations, labels, num_classes):
  """``operations`` computing the margin logits z_y - z_j (`margin_operation`)."""
  margin, folded = margin_operation(operations[-1], labels, num_classes)
  return operations[:-1] + [margin] if folded else operations + [margin]


class Network:
  """A validated model, inputs and labels, ready for bounds."""

  def __init__(self, model, x, labels=None, training=False):
    check_inference(training)
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
      raise ValueError(f"x must be a float tensor; got dtype {x.dtype.name}.")
    if labels is not None:
      labels, _ = attacks.check_logits_and_labels(model, x, labels)
    elif x.shape.rank is None or x.shape.rank < 2 or x.shape[0] == 0:
      raise ValueError(f"x must be a non-empty batch [batch, ...]; got {x.shape}.")
    self.x = tf.cast(x, DTYPE)
    self.operations = network(model, self.x.shape[1:])
    self.logits = check_reproduces(model, self.operations, self.x)
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
      operations = with_margin(operations, labels, self.num_classes)
    inputs = InputSet(x, epsilon, norm, clip_min, clip_max)
    return output_bounds(operations, inputs, method)

  def worst_margin(self, epsilon, norm, method, clip_min, clip_max, rows=None):
    """min_{j != y} of the lower bounds of z_y - z_j: [rows]."""
    box = self.bounds(epsilon, norm, method, clip_min, clip_max, True, rows)
    labels = self.labels if rows is None else tf.gather(self.labels, rows)
    own = tf.one_hot(labels, self.num_classes, dtype=DTYPE) > 0
    return tf.reduce_min(tf.where(own, tf.constant(np.inf, DTYPE), box.lower), 1)


def _bounds(model, x, epsilon, norm, labels, method, clip_min, clip_max, training):
  """Shared body of `interval_bounds` and `crown_bounds`."""
  check_norm(norm)
  net = Network(model, x, labels, training)
  epsilon = check_epsilon(epsilon, net.x.shape[0])
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
  return _bounds(model, x, epsilon, norm, labels, IBP, clip_min, clip_max, training)


def crown_bounds(
    model,
    x,
    epsilon,
    norm=np.inf,
    labels=None,
    clip_min=None,
    clip_max=None,
    intermediate=CROWN,
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
  method = CROWN if intermediate == CROWN else CROWN_IBP
  return _bounds(model, x, epsilon, norm, labels, method, clip_min, clip_max, training)


def margin_lower_bound(
    model,
    x,
    labels,
    epsilon,
    norm=np.inf,
    method=IBP,
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
  epsilon = check_epsilon(epsilon, net.x.shape[0])
  clip_min, clip_max = check_clip(net.x, clip_min, clip_max)
  return net.worst_margin(epsilon, norm, method, clip_min, clip_max).numpy()


def certified_radius(
    model,
    x,
    labels,
    norm=np.inf,
    method=IBP,
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
  steps = attacks.check_steps(steps)
  max_radius = attacks.check_nonnegative("max_radius", max_radius)
  if max_radius == 0:
    raise ValueError("max_radius must be > 0.")
  net = Network(model, x, labels, training)
  clip_min, clip_max = check_clip(net.x, clip_min, clip_max)
  batch = net.x.shape[0]
  predicted = tf.argmax(net.logits, axis=1, output_type=tf.int32)
  correct = (predicted == net.labels).numpy()

  def certified(radius, rows):
    epsilon = tf.constant(radius, DTYPE)
    bound = net.worst_margin(epsilon, norm, method, clip_min, clip_max, rows)
    return bound.numpy() > 0.0

  lower, upper = np.zeros(batch), np.full(batch, max_radius)
  rows = np.flatnonzero(correct)
  if rows.size:
    top = certified(upper[rows], tf.constant(rows, tf.int32))
    lower[rows[top]] = max_radius
    rows = rows[~top]
  for _ in range(steps):
    if not rows.size:
      break
    middle = (lower[rows] + upper[rows]) / 2.0
    ok = certified(middle, tf.constant(rows, tf.int32))
    lower[rows[ok]], upper[rows[~ok]] = middle[ok], middle[~ok]
  return lower
