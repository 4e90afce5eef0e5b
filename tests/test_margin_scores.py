"""Eq. 10's numerators and cotangents (`margin_scores`) against numpy, and the
logit score of Eq. 10 (value and weight gradients) against the per-example reference."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import margin_scores

from margin_loss_reference import CLASSES
from margin_loss_reference import TinyNet
from margin_loss_reference import library_distances
from margin_loss_reference import library_loss_eager
from margin_loss_reference import library_loss_graph
from margin_loss_reference import make_data
from margin_loss_reference import reference_loss
from margin_loss_reference import typical_gamma
from margin_loss_reference import value_and_grads

LOGITS = np.array([[0.5, 2.0, -1.0, 1.5], [3.0, 3.0, 0.0, -2.0]])
LABELS = np.array([2, 3])


def one_hot():
  return tf.one_hot(LABELS, 4, dtype=tf.float64)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_logit_differences_and_cotangents(top_k):
  differences, cotangents = margin_scores.score_differences(
      tf.constant(LOGITS), one_hot(), top_k, score="logits"
  )
  for b, y in enumerate(LABELS):
    order = [i for i in np.argsort(-LOGITS[b], kind="stable") if i != y][:top_k]
    if top_k == 1 and b == 1:
      order = [0]  # Tie between classes 0 and 1: both share the competitor weight.
    np.testing.assert_allclose(
        differences.numpy()[b], LOGITS[b, y] - LOGITS[b, order], rtol=1e-15
    )
    for j, competitor in enumerate(order):
      expected = np.eye(4)[y] - np.eye(4)[competitor]
      if top_k == 1 and b == 1:
        expected = np.eye(4)[y] - 0.5 * (np.eye(4)[0] + np.eye(4)[1])
      np.testing.assert_allclose(cotangents[j].numpy()[b], expected)


def test_logit_cotangent_is_the_gradient_of_the_difference():
  """The cotangent is d(z_y - z_(j))/dz, as TensorFlow differentiates it."""
  logits = tf.constant(LOGITS)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(logits)
    differences, cotangents = margin_scores.score_differences(
        logits, one_hot(), 2, score="logits"
    )
    columns = [differences[:, j] for j in range(2)]
  for column, cotangent in zip(columns, cotangents):
    np.testing.assert_allclose(tape.gradient(column, logits), cotangent.numpy())


def test_probability_score_is_the_default_and_the_softmax_jacobian():
  logits = tf.constant(LOGITS)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(logits)
    differences, cotangents = margin_scores.score_differences(logits, one_hot(), 2)
    columns = [differences[:, j] for j in range(2)]
  p = tf.nn.softmax(logits).numpy()
  np.testing.assert_allclose(
      differences.numpy()[0], p[0, 2] - np.sort(np.delete(p[0], 2))[::-1][:2]
  )
  for column, cotangent in zip(columns, cotangents):
    np.testing.assert_allclose(tape.gradient(column, logits), cotangent.numpy())


def test_errors():
  with pytest.raises(ValueError, match="score must be one of"):
    margin_scores.check_score("probability")
  with pytest.raises(ValueError, match="top_k < classes"):
    margin_scores.score_differences(tf.constant(LOGITS), one_hot(), 4, score="logits")


@pytest.mark.parametrize(
    "dist_norm,top_k,worst_case_loss,use_approximation",
    list(itertools.product([1, 2, np.inf], [1, 3], [True, False], [True, False])),
)
def test_logit_score_matches_per_example_reference(
    dist_norm, top_k, worst_case_loss, use_approximation
):
  """score="logits": d = (z_y - z_j) / (eps + ||grad (z_y - z_j)||_q), value and
  weight gradients against the per-example, per-class tapes."""
  net = TinyNet()
  x, labels = make_data()
  kwargs = dict(
      gamma=typical_gamma(net, x, labels, score="logits"),
      alpha_factor=3.0,  # Below -2 gamma: clips none of these distances.
      top_k=top_k,
      dist_norm=dist_norm,
      epsilon=1e-6,
      use_approximation=use_approximation,
      worst_case_loss=worst_case_loss,
      layers_weights=[2.0, 0.5, 1.0, 3.0],
      score="logits",
  )
  ref_value, ref_grads = value_and_grads(reference_loss, net, x, labels, kwargs)
  probability_value, _ = value_and_grads(
      library_loss_eager, net, x, labels, dict(kwargs, score="probabilities")
  )
  assert abs(probability_value - ref_value) > 1e-3 * abs(ref_value)  # Not the same.
  for fn in (library_loss_eager, library_loss_graph):
    value, grads = value_and_grads(fn, net, x, labels, kwargs)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6 * kwargs["gamma"])
    for g, ref in zip(grads, ref_grads):
      np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_logit_score_at_the_logits_is_the_scaled_logit_gap():
  """At the logits themselves grad (z_y - z_j) = e_y - e_j: the distance is
  (z_y - z_j) / (eps + ||e_y - e_j||_q), the exact distance in logit space."""
  net = TinyNet(dtype=tf.float64)
  x, labels = make_data(np.float64)
  for dist_norm, dual_length in ((1, 1.0), (2, np.sqrt(2.0)), (np.inf, 2.0)):
    _, distances = library_distances(
        net, x, labels, dist_norm=dist_norm, score="logits", epsilon=1e-9
    )
    logits = net.layers(x)[-1].numpy()
    for b, y in enumerate(labels):
      others = np.delete(logits[b], y)
      expected = (logits[b, y] - np.sort(others)[::-1]) / (dual_length + 1e-9)
      np.testing.assert_allclose(distances[-1].numpy()[b], expected, rtol=1e-12)


@pytest.mark.parametrize("top_k", [2, 3, 5])
def test_top_competitors_break_ties_as_tf_top_k(top_k):
  """Many ties (values from {0, 1, 2}): the k columns and their order are those of
  `tf.math.top_k` (lowest index first among equals), also in float32."""
  rng = np.random.default_rng(3)
  for dtype in ("float32", "float64"):
    others = rng.integers(0, 3, size=(64, 7)).astype(dtype)
    values, competitors = margin_scores.top_competitors(tf.constant(others), top_k)
    expected_values, expected_indices = tf.math.top_k(others, k=top_k)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(np.argmax(competitors, axis=-1), expected_indices)
    np.testing.assert_array_equal(np.sum(competitors, axis=-1), 1.0)
