"""margin_penalty: the clipped distance loss and the fraction of examples it moves."""

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import margin_penalty


def gradient_nonzero(distances, gamma, alpha_factor, worst_case_loss):
  """Per example: does the loss have a nonzero gradient w.r.t. its distances?"""
  d = tf.Variable(distances)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(
        margin_penalty.distance_loss(d, gamma, alpha_factor, worst_case_loss)
    )
  return np.any(tape.gradient(loss, d).numpy() != 0, axis=1)


@pytest.mark.parametrize("worst_case_loss", [True, False])
@pytest.mark.parametrize("gamma,alpha_factor", [(1.0, 2.0), (10.0, 0.5), (3.0, 4.0)])
def test_active_fraction_is_the_fraction_with_a_gradient(gamma, alpha_factor, worst_case_loss):
  rng = np.random.default_rng(0)
  lower = gamma * (1 - alpha_factor)
  distances = rng.uniform(lower - gamma / 2, 2 * gamma - lower, size=(200, 3)).astype("float32")
  expected = gradient_nonzero(distances, gamma, alpha_factor, worst_case_loss).mean()
  measured = margin_penalty.active_fraction(distances, gamma, alpha_factor, worst_case_loss)
  assert float(measured) == pytest.approx(expected)
  assert 0.02 < expected < 0.98  # The draw has both kinds of examples.


def test_active_fraction_of_an_empty_batch_is_zero():
  assert float(margin_penalty.active_fraction(tf.zeros([0, 2]), 1.0, 2.0)) == 0.0
