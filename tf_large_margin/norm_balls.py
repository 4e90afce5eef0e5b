"""The l_p balls of the attacks and bounds: directions, projections and samples.

For a batch of examples x [batch, ...] and per-example radii eps (a scalar or
[batch]), the ball around example i is

    B_p(x_i, eps_i) = {x' : ||x' - x_i||_p <= eps_i},   ||.||_p over all the
                                                        example's entries.

The functions below are graph code without validation, shared by the attacks
(`tf_large_margin.attacks`), DeepFool (`tf_large_margin.margin_estimation`) and the
certified bounds (`tf_large_margin.certified`).
"""

import numpy as np
import tensorflow as tf

from tf_large_margin import margin_loss


def expand_to(per_example, like):
  """A [batch] tensor reshaped to broadcast against ``like`` [batch, ...]."""
  return tf.reshape(per_example, [-1] + [1] * (like.shape.rank - 1))


def steepest_ascent_direction(gradient, norm):
  """u = argmax_{||u||_p <= 1} <g, u>, so that <g, u> = ||g||_q (0 if g = 0).

  l_inf: sign(g); l_2: g / ||g||_2; l_1: sign(g_m) e_m at m = argmax_i |g_i| (the
  first such i).
  """
  if norm == np.inf:
    return tf.sign(gradient)
  if norm == 2:
    return tf.math.divide_no_nan(
        gradient, expand_to(margin_loss.flat_norm(gradient, 2), gradient)
    )
  flat = tf.reshape(gradient, [tf.shape(gradient)[0], -1])
  largest = tf.one_hot(
      tf.argmax(tf.abs(flat), axis=1), tf.shape(flat)[1], dtype=gradient.dtype
  )
  return tf.reshape(largest * tf.sign(flat), tf.shape(gradient))


def project_to_ball(delta, epsilon, norm):
  """Euclidean projection of each example of ``delta`` onto {||d||_p <= epsilon}.

  l_inf: clip each coordinate to [-epsilon, epsilon]; l_2: delta * min(1, epsilon /
  ||delta||_2).
  """
  if norm == np.inf:
    return tf.clip_by_value(delta, -epsilon, epsilon)
  norms = expand_to(margin_loss.flat_norm(delta, 2), delta)
  # (the tensor first: a leading 1.0 would be float32 against float64 inputs)
  return delta * tf.minimum(epsilon / tf.maximum(norms, 1e-12), 1.0)


def random_ball_point(x, epsilon, norm, seed):
  """A point drawn uniformly from the l_p ball of radius epsilon (stateless ``seed``).

  l_2: a Gaussian direction scaled to radius epsilon * u^(1/d), u ~ U(0, 1), d the
  input dimension.
  """
  if norm == np.inf:
    return tf.random.stateless_uniform(tf.shape(x), seed, -epsilon, epsilon, x.dtype)
  direction = tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype)
  direction = steepest_ascent_direction(direction, 2)
  dimension = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
  u = tf.random.stateless_uniform(tf.shape(x)[:1], seed + 1, dtype=x.dtype)
  return direction * expand_to(epsilon * u ** (1.0 / dimension), x)
