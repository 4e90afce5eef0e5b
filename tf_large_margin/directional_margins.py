"""How a fixed perturbation direction meets a model: alignment and distance.

A black-box (transfer) attack moves an input along a direction u chosen on another
model, e.g. u = sign(grad_x L_source) for FGSM. Whether it fools the target model
depends on two things, which these functions measure per example:

* how far the target's decision boundary is along u (`directional_margins`):

      t* = min { t : argmax_k z_k(clip(x + t u)) != y },

  searched on the grid t = max_distance * i / num_steps, i = 0 .. num_steps: with
  u = sign(g) the smallest grid radius at which FGSM transferred along u fools
  the model (0 if x is misclassified, inf if no grid point does);

* how much of the target's own steepest first-order decrease of its logit margin
  m = z_y - max_{j != y} z_j the direction achieves (`direction_alignment`),

      a = -<g, u_f> / (||g_f||_q ||u_f||_p),   g = grad_x m(x),  1/p + 1/q = 1,

  where u_f and g_f keep only the coordinates along which the input can move
  inside the data range [clip_min, clip_max] (u_f: u without the components that
  push a coordinate at a bound outward; g_f: g without those whose descent step
  -g_i would). ||g_f||_q ||u_f||_p bounds -<g, u_f> (Hoelder), so a <= 1, with
  equality for the target's own steepest feasible direction (for p = inf,
  u = -sign(g), FGSM on the target's logit margin); a = 0 for a direction the
  target's margin does not change along to first order.

To first order the distance along u is the target's own worst-case distance
m / ||g_f||_q divided by a: a black-box attack is strong on a target with a small
white-box margin or a large alignment.
"""

import numpy as np
import tensorflow as tf

from tf_large_margin import argument_checks
from tf_large_margin import attacks
from tf_large_margin import margin_loss


def _feasible(values, x, clip_min, clip_max):
  """``values`` without the components that move x outward at a bound."""
  outward = ((x <= clip_min) & (values < 0)) | ((x >= clip_max) & (values > 0))
  return tf.where(outward, tf.zeros_like(values), values)


def _checked_inputs(model, x, labels, directions, clip_min, clip_max):
  """The checks both functions share: ``(x, int32 labels, directions, clip_min,
  clip_max)`` as tensors of x's float dtype, after checking that x lies in the data
  range and that ``directions`` has x's shape."""
  x, labels = argument_checks.float_inputs_and_labels(model, x, labels)
  argument_checks.check_data_range(x, clip_min, clip_max)
  directions = tf.convert_to_tensor(directions, x.dtype)
  if directions.shape != x.shape:
    raise ValueError(
        f"directions must have the inputs' shape {x.shape}; got {directions.shape}."
    )
  return x, labels, directions, tf.constant(clip_min, x.dtype), tf.constant(clip_max, x.dtype)


@tf.function(reduce_retracing=True)
def _alignment_graph(model, x, labels, directions, norm, clip_min, clip_max):
  with tf.GradientTape() as tape:
    tape.watch(x)
    margin = -attacks.logit_margin(model(x, training=False), labels)
  gradient = tape.gradient(margin, x)
  feasible_direction = _feasible(directions, x, clip_min, clip_max)
  feasible_gradient = -_feasible(-gradient, x, clip_min, clip_max)
  decrease = -tf.reduce_sum(
      tf.reshape(gradient * feasible_direction, [tf.shape(x)[0], -1]), axis=1
  )
  scale = margin_loss.flat_norm(
      feasible_gradient, margin_loss.dual_norm(norm)
  ) * margin_loss.flat_norm(feasible_direction, norm)
  return tf.math.divide_no_nan(decrease, scale)


def direction_alignment(
    model, x, labels, directions, norm=np.inf, clip_min=0.0, clip_max=1.0
):
  """Alignment a of each direction with the model's steepest margin decrease.

      a = -<grad_x m, u_f> / (||g_f||_q ||u_f||_p),   m = z_y - max_{j != y} z_j

  (see the module docstring for u_f and g_f, the feasible parts).

  Args:
    model: a Keras model returning [batch, classes] logits.
    x: [batch, ...] float inputs inside [clip_min, clip_max].
    labels: [batch] integer labels.
    directions: [batch, ...] directions u, shaped as ``x`` (any scale: a is
      scale-invariant).
    norm: p, 1, 2 or np.inf, the norm the directions are measured in.
    clip_min, clip_max: the data range; pass -np.inf / np.inf for none.

  Returns:
    A [batch] float32 numpy array in [-1, 1]; 0 where u_f or g_f is 0.
  """
  margin_loss.dual_norm(norm)
  x, labels, directions, low, high = _checked_inputs(
      model, x, labels, directions, clip_min, clip_max
  )
  return _alignment_graph(model, x, labels, directions, norm, low, high).numpy()


@tf.function(reduce_retracing=True)
def _directional_graph(model, x, labels, directions, radii, clip_min, clip_max):
  def flips(radius):
    moved = tf.clip_by_value(x + radius * directions, clip_min, clip_max)
    return attacks.misclassified(model(moved, training=False), labels)

  flipped = tf.map_fn(flips, radii, fn_output_signature=tf.bool)  # [steps, batch]
  first = tf.argmax(tf.cast(flipped, tf.int32), axis=0, output_type=tf.int32)
  never = tf.logical_not(tf.reduce_any(flipped, axis=0))
  return tf.where(
      never, tf.constant(np.inf, radii.dtype), tf.gather(radii, first)
  )


def directional_margins(
    model,
    x,
    labels,
    directions,
    max_distance,
    num_steps=60,
    clip_min=0.0,
    clip_max=1.0,
):
  """Smallest grid radius t along each direction at which the model errs.

      t* = min { t in max_distance * (0, 1, .., num_steps) / num_steps :
                 argmax_k z_k(clip(x + t u)) != y }

  With u = sign(grad_x L_source(x)), t* is the smallest grid radius epsilon at which
  FGSM crafted on the source fools the model. The prediction may turn correct again
  further along the line, so the black-box FGSM accuracy at epsilon is at least the
  fraction of examples with t* > epsilon (equal where it does not).

  Args:
    model: a Keras model returning [batch, classes] logits.
    x: [batch, ...] float inputs inside [clip_min, clip_max].
    labels: [batch] integer labels.
    directions: [batch, ...] directions u (t is in units of u: for sign
      directions an l_inf radius).
    max_distance: the largest radius searched, > 0.
    num_steps: grid intervals, >= 1.
    clip_min, clip_max: the data range; pass -np.inf / np.inf for none.

  Returns:
    A [batch] float32 numpy array: 0 where x is misclassified, inf where no grid
    radius up to ``max_distance`` flips the prediction.
  """
  max_distance = argument_checks.check_nonnegative("max_distance", max_distance)
  if max_distance == 0.0:
    raise ValueError("max_distance must be > 0.")
  num_steps = argument_checks.check_steps(num_steps, "num_steps")
  x, labels, directions, low, high = _checked_inputs(
      model, x, labels, directions, clip_min, clip_max
  )
  radii = tf.constant(max_distance * np.arange(num_steps + 1) / num_steps, x.dtype)
  return _directional_graph(model, x, labels, directions, radii, low, high).numpy()
