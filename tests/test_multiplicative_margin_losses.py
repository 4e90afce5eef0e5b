"""Tests for L-Softmax and SphereFace, with and without lambda annealing (vs numpy)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import multiplicative_margin_losses
from output_margin_reference import (  # pylint: disable=unused-import
    keras_xent,
    N,
    np_psi_k,
    np_l_softmax,
    per_example,
    rng,
    labels,
    cos,
    norms,
    head_output,
    sphere_norms,
    np_l_softmax_annealed,
)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_l_softmax_matches_numpy(labels, cos, norms, m):
  cos_y = cos[np.arange(N), labels]
  ks = {np_psi_k(np.arccos(c), m)[1] for c in cos_y}
  assert ks == set(range(m))  # every piece of psi is exercised
  expected = per_example(np_l_softmax, cos, norms, labels, m=m)
  y_pred = head_output(cos, norms)
  np.testing.assert_allclose(
      multiplicative_margin_losses.l_softmax(labels, y_pred, m=m),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  np.testing.assert_allclose(
      multiplicative_margin_losses.LSoftmax(m=m, reduction="none")(labels, y_pred),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )


def test_psi_is_continuous_and_decreasing():
  for m in (2, 3, 4, 5):
    theta = np.linspace(0.0, np.pi, 2001)
    c = tf.constant(np.cos(theta), tf.float64)
    psi = np.asarray(multiplicative_margin_losses._psi(c, m))
    ref = np.array([np_psi_k(t, m)[0] for t in theta])
    np.testing.assert_allclose(psi, ref, atol=1e-9)
    assert np.all(np.diff(psi) <= 1e-12)
    assert np.max(np.abs(np.diff(psi))) < 0.05  # no jumps
    np.testing.assert_allclose([psi[0], psi[-1]], [1.0, 1.0 - 2.0 * m], atol=1e-9)


@pytest.mark.parametrize("m", [2, 4])
def test_sphereface_matches_numpy(rng, labels, cos, m):
  norms = sphere_norms(rng)
  expected = per_example(np_l_softmax, cos, norms, labels, m=m)
  y_pred = head_output(cos, norms)
  np.testing.assert_allclose(
      multiplicative_margin_losses.sphereface(labels, y_pred, m=m),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  np.testing.assert_allclose(
      multiplicative_margin_losses.SphereFace(m=m, reduction="none")(labels, y_pred),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  assert (
      multiplicative_margin_losses.ASoftmax is multiplicative_margin_losses.SphereFace
  )


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0, 100.0])
def test_annealed_l_softmax_matches_numpy(rng, labels, cos, norms, m, lam):
  expected = per_example(np_l_softmax_annealed, cos, norms, labels, m=m, lam=lam)
  y_pred = head_output(cos, norms)
  for got in (
      multiplicative_margin_losses.l_softmax(labels, y_pred, m=m, lambda_=lam),
      multiplicative_margin_losses.l_softmax(
          labels, y_pred, m=m, lambda_=tf.constant(lam)
      ),
      multiplicative_margin_losses.LSoftmax(m=m, lambda_=lam, reduction="none")(
          labels, y_pred
      ),
  ):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  sn = sphere_norms(rng)
  y_pred = head_output(cos, sn)
  expected = per_example(np_l_softmax_annealed, cos, sn, labels, m=m, lam=lam)
  np.testing.assert_allclose(
      multiplicative_margin_losses.SphereFace(m=m, lambda_=lam, reduction="none")(
          labels, y_pred
      ),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )


def test_lambda_zero_is_the_unannealed_loss(labels, cos, norms):
  y_pred = head_output(cos, norms)
  for m in (2, 4):
    plain = np.asarray(multiplicative_margin_losses.l_softmax(labels, y_pred, m=m))
    np.testing.assert_array_equal(
        multiplicative_margin_losses.l_softmax(labels, y_pred, m=m, lambda_=0), plain
    )
    np.testing.assert_array_equal(
        multiplicative_margin_losses.LSoftmax(m=m, lambda_=0.0, reduction="none")(
            labels, y_pred
        ),
        plain,
    )
  assert (
      multiplicative_margin_losses.LSoftmax().lambda_ == 0.0
      and multiplicative_margin_losses.SphereFace().lambda_ == 0.0
  )
  assert multiplicative_margin_losses.LSoftmax().step is None


@pytest.mark.parametrize(
    "fn",
    [multiplicative_margin_losses.l_softmax, multiplicative_margin_losses.sphereface],
)
@pytest.mark.parametrize("m", [2, 3, 4])
def test_lambda_to_infinity_is_softmax_cross_entropy(rng, labels, cos, norms, fn, m):
  if fn is multiplicative_margin_losses.sphereface:
    norms = sphere_norms(rng)
  y_pred = head_output(cos, norms)
  ref = keras_xent(labels, norms * cos)
  np.testing.assert_allclose(
      fn(labels, y_pred, m=m, lambda_=1e12), ref, rtol=1e-5, atol=1e-5
  )
  # ... and the loss falls monotonically towards it as lambda grows (psi <= cos)
  values = [np.asarray(fn(labels, y_pred, m=m, lambda_=lam)) for lam in (0, 1, 10, 1e3)]
  for smaller, larger in zip(values[1:], values[:-1]):
    assert np.all(smaller <= larger + 1e-5)
  assert np.all(values[-1] >= ref - 1e-5)
