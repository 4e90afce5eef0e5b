"""Tests for the multi-class hinge loss (numbers checked against numpy)."""

import keras
import numpy as np
import pytest

from tf_large_margin import hinge_loss
from output_margin_reference import (  # pylint: disable=unused-import
    N,
    C,
    np_crammer_singer,
    np_weston_watkins,
    per_example,
    rng,
    labels,
)


@pytest.mark.parametrize("variant", ["crammer_singer", "weston_watkins"])
def test_hinge_matches_numpy(rng, labels, variant):
  z = rng.normal(size=(N, C)).astype(np.float32)
  margin = 0.7
  ref_fn = np_crammer_singer if variant == "crammer_singer" else np_weston_watkins
  expected = per_example(ref_fn, z, labels, margin=margin)
  assert np.count_nonzero(expected) > N // 4  # the hinge is active
  assert np.count_nonzero(expected == 0) > 0 or variant == "weston_watkins"

  got_fn = hinge_loss.multiclass_hinge(labels, z, variant=variant, margin=margin)
  got_cls = hinge_loss.MulticlassHinge(
      variant=variant, margin=margin, reduction="none"
  )(labels, z)
  np.testing.assert_allclose(got_fn, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_cls, expected, rtol=1e-5, atol=1e-5)
  mean = hinge_loss.MulticlassHinge(variant=variant, margin=margin)(labels, z)
  np.testing.assert_allclose(mean, expected.mean(), rtol=1e-5)


def test_hinge_variants_differ(rng, labels):
  z = rng.normal(size=(N, C)).astype(np.float32)
  cs = np.asarray(hinge_loss.multiclass_hinge(labels, z, "crammer_singer"))
  ww = np.asarray(hinge_loss.multiclass_hinge(labels, z, "weston_watkins"))
  # WW sums the violations, CS takes the largest one.
  assert np.all(ww >= cs - 1e-6) and np.any(ww > cs + 1e-3)


def test_hinge_with_cross_entropy_weight():
  rng = np.random.default_rng(5)
  y_pred = rng.normal(size=(6, 4)).astype("float32")
  y_true = rng.integers(0, 4, size=6)
  hinge = hinge_loss.MulticlassHinge(reduction=None)(y_true, y_pred).numpy()
  xent = keras.losses.sparse_categorical_crossentropy(
      y_true, y_pred, from_logits=True
  ).numpy()
  combined = hinge_loss.MulticlassHinge(cross_entropy_weight=0.3, reduction=None)
  np.testing.assert_allclose(
      combined(y_true, y_pred).numpy(), hinge + 0.3 * xent, rtol=1e-6
  )
  restored = keras.losses.deserialize(keras.losses.serialize(combined))
  assert restored.cross_entropy_weight == 0.3
  with pytest.raises(ValueError, match="cross_entropy_weight"):
    hinge_loss.MulticlassHinge(cross_entropy_weight=-1.0)
