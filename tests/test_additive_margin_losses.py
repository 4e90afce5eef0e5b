"""Tests for the AM-Softmax / CosFace and ArcFace (numbers checked against numpy)."""

import numpy as np
import pytest

from tf_large_margin import additive_margin_losses
from output_margin_reference import (  # pylint: disable=unused-import
    rng,
    N,
    np_am_softmax,
    np_arcface,
    per_example,
    labels,
    cos,
)


def test_am_softmax_matches_numpy(labels, cos):
  margin, scale = 0.35, 16.0
  expected = per_example(np_am_softmax, cos, labels, margin=margin, scale=scale)
  np.testing.assert_allclose(
      additive_margin_losses.am_softmax(labels, cos, margin=margin, scale=scale),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  np.testing.assert_allclose(
      additive_margin_losses.AMSoftmax(margin, scale, reduction="none")(labels, cos),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  assert (
      additive_margin_losses.CosFace is additive_margin_losses.AMSoftmax
      and additive_margin_losses.cosface is additive_margin_losses.am_softmax
  )


def test_arcface_matches_numpy(labels, cos):
  margin, scale = 0.5, 16.0
  cos_y = cos[np.arange(N), labels]
  # both branches (theta_y + m below / above pi) are exercised
  assert np.any(cos_y > np.cos(np.pi - margin))
  assert np.any(cos_y < np.cos(np.pi - margin))
  expected = per_example(np_arcface, cos, labels, margin=margin, scale=scale)
  np.testing.assert_allclose(
      additive_margin_losses.arcface(labels, cos, margin=margin, scale=scale),
      expected,
      rtol=1e-5,
      atol=1e-3,
  )
  np.testing.assert_allclose(
      additive_margin_losses.ArcFace(margin, scale, reduction="none")(labels, cos),
      expected,
      rtol=1e-5,
      atol=1e-3,
  )
