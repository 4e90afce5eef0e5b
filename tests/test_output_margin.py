"""Tests for tf_large_margin.output_margin (numbers checked against numpy)."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_large_margin import output_margin as om  # noqa: E402
from tf_large_margin.layers import CosineHead  # noqa: E402

N, C = 48, 5


# --------------------------------------------------------------------------
# numpy references: literal per-example transcriptions of the formulas
# --------------------------------------------------------------------------


def np_xent(logits, y):
  logits = np.asarray(logits, np.float64)
  mx = logits.max()
  return -(logits[y] - mx - np.log(np.sum(np.exp(logits - mx))))


def np_crammer_singer(z, y, margin):
  worst_other = max(z[j] for j in range(len(z)) if j != y)
  return max(0.0, margin + worst_other - z[y])


def np_weston_watkins(z, y, margin):
  return sum(max(0.0, margin - (z[y] - z[j])) for j in range(len(z)) if j != y)


def np_am_softmax(c, y, margin, scale):
  logits = scale * np.array(c, np.float64)
  logits[y] = scale * (c[y] - margin)
  return np_xent(logits, y)


def np_arcface(c, y, margin, scale):
  logits = scale * np.array(c, np.float64)
  theta = np.arccos(np.clip(c[y], -1.0, 1.0))
  if theta + margin < np.pi:
    logits[y] = scale * np.cos(theta + margin)
  else:
    logits[y] = scale * (c[y] - margin * np.sin(margin))
  return np_xent(logits, y)


def np_psi_k(theta, m):
  k = min(int(np.floor(m * theta / np.pi)), m - 1)
  return (-1) ** k * np.cos(m * theta) - 2 * k, k


def np_l_softmax(c, norms, y, m):
  logits = np.array(norms, np.float64) * np.array(c, np.float64)
  psi, _ = np_psi_k(np.arccos(np.clip(c[y], -1.0, 1.0)), m)
  logits[y] = norms[y] * psi
  return np_xent(logits, y)


def per_example(fn, *arrays, **kw):
  return np.array(
      [
          fn(*[a[i] for a in arrays[:-1]], arrays[-1][i], **kw)
          for i in range(len(arrays[-1]))
      ]
  )


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture
def labels(rng):
  return rng.integers(0, C, size=N)


@pytest.fixture
def cos(rng):
  return rng.uniform(-1.0, 1.0, size=(N, C)).astype(np.float32)


@pytest.fixture
def norms(rng):
  return rng.uniform(0.5, 3.0, size=(N, C)).astype(np.float32)


def _concat(c, n):
  return np.concatenate([c, n], axis=-1).astype(np.float32)


def _sphere_norms(rng):
  """SphereFace input: the per-class factor is ||x||, equal across classes."""
  return np.repeat(rng.uniform(0.5, 3.0, size=(N, 1)), C, axis=1).astype(np.float32)


# --------------------------------------------------------------------------
# values == numpy formulas
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["crammer_singer", "weston_watkins"])
def test_hinge_matches_numpy(rng, labels, variant):
  z = rng.normal(size=(N, C)).astype(np.float32)
  margin = 0.7
  ref_fn = np_crammer_singer if variant == "crammer_singer" else np_weston_watkins
  expected = per_example(ref_fn, z, labels, margin=margin)
  assert np.count_nonzero(expected) > N // 4  # the hinge is active
  assert np.count_nonzero(expected == 0) > 0 or variant == "weston_watkins"

  got_fn = om.multiclass_hinge(labels, z, variant=variant, margin=margin)
  got_cls = om.MulticlassHinge(variant=variant, margin=margin, reduction="none")(
      labels, z
  )
  np.testing.assert_allclose(got_fn, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_cls, expected, rtol=1e-5, atol=1e-5)
  mean = om.MulticlassHinge(variant=variant, margin=margin)(labels, z)
  np.testing.assert_allclose(mean, expected.mean(), rtol=1e-5)


def test_hinge_variants_differ(rng, labels):
  z = rng.normal(size=(N, C)).astype(np.float32)
  cs = np.asarray(om.multiclass_hinge(labels, z, "crammer_singer"))
  ww = np.asarray(om.multiclass_hinge(labels, z, "weston_watkins"))
  # WW sums the violations, CS takes the largest one.
  assert np.all(ww >= cs - 1e-6) and np.any(ww > cs + 1e-3)


def test_am_softmax_matches_numpy(labels, cos):
  margin, scale = 0.35, 16.0
  expected = per_example(np_am_softmax, cos, labels, margin=margin, scale=scale)
  np.testing.assert_allclose(
      om.am_softmax(labels, cos, margin=margin, scale=scale),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  np.testing.assert_allclose(
      om.AMSoftmax(margin, scale, reduction="none")(labels, cos),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  assert om.CosFace is om.AMSoftmax and om.cosface is om.am_softmax


def test_arcface_matches_numpy(labels, cos):
  margin, scale = 0.5, 16.0
  cos_y = cos[np.arange(N), labels]
  # both branches (theta_y + m below / above pi) are exercised
  assert np.any(cos_y > np.cos(np.pi - margin))
  assert np.any(cos_y < np.cos(np.pi - margin))
  expected = per_example(np_arcface, cos, labels, margin=margin, scale=scale)
  np.testing.assert_allclose(
      om.arcface(labels, cos, margin=margin, scale=scale),
      expected,
      rtol=1e-5,
      atol=1e-3,
  )
  np.testing.assert_allclose(
      om.ArcFace(margin, scale, reduction="none")(labels, cos),
      expected,
      rtol=1e-5,
      atol=1e-3,
  )


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_l_softmax_matches_numpy(labels, cos, norms, m):
  cos_y = cos[np.arange(N), labels]
  ks = {np_psi_k(np.arccos(c), m)[1] for c in cos_y}
  assert ks == set(range(m))  # every piece of psi is exercised
  expected = per_example(np_l_softmax, cos, norms, labels, m=m)
  y_pred = _concat(cos, norms)
  np.testing.assert_allclose(
      om.l_softmax(labels, y_pred, m=m), expected, rtol=1e-5, atol=1e-4
  )
  np.testing.assert_allclose(
      om.LSoftmax(m=m, reduction="none")(labels, y_pred),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )


def test_psi_is_continuous_and_decreasing():
  for m in (2, 3, 4, 5):
    theta = np.linspace(0.0, np.pi, 2001)
    c = tf.constant(np.cos(theta), tf.float64)
    psi = np.asarray(om._psi(c, m))
    ref = np.array([np_psi_k(t, m)[0] for t in theta])
    np.testing.assert_allclose(psi, ref, atol=1e-9)
    assert np.all(np.diff(psi) <= 1e-12)
    assert np.max(np.abs(np.diff(psi))) < 0.05  # no jumps
    np.testing.assert_allclose([psi[0], psi[-1]], [1.0, 1.0 - 2.0 * m], atol=1e-9)


@pytest.mark.parametrize("m", [2, 4])
def test_sphereface_matches_numpy(rng, labels, cos, m):
  norms = _sphere_norms(rng)
  expected = per_example(np_l_softmax, cos, norms, labels, m=m)
  y_pred = _concat(cos, norms)
  np.testing.assert_allclose(
      om.sphereface(labels, y_pred, m=m), expected, rtol=1e-5, atol=1e-4
  )
  np.testing.assert_allclose(
      om.SphereFace(m=m, reduction="none")(labels, y_pred),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )
  assert om.ASoftmax is om.SphereFace


def test_margins_make_the_loss_larger(labels, cos, norms):
  base = np.asarray(om.am_softmax(labels, cos, margin=0.0, scale=8.0))
  assert np.all(np.asarray(om.am_softmax(labels, cos, 0.3, 8.0)) > base)
  assert np.all(np.asarray(om.arcface(labels, cos, 0.3, 8.0)) > base)
  y_pred = _concat(cos, norms)
  base = np.asarray(om.l_softmax(labels, y_pred, m=1))
  bigger = np.asarray(om.l_softmax(labels, y_pred, m=3))
  assert np.all(bigger >= base - 1e-5) and np.mean(bigger > base + 1e-3) > 0.9


# --------------------------------------------------------------------------
# reduction to plain softmax cross-entropy
# --------------------------------------------------------------------------


def _xent(labels, logits):
  return np.asarray(
      keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
  )


def test_reduce_to_cross_entropy(rng, labels, cos, norms):
  ref = _xent(labels, cos)
  np.testing.assert_allclose(
      om.am_softmax(labels, cos, 0.0, 1.0), ref, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
      om.arcface(labels, cos, 0.0, 1.0), ref, rtol=1e-5, atol=1e-6
  )
  # the scale alone is just a temperature
  np.testing.assert_allclose(
      om.am_softmax(labels, cos, 0.0, 7.0),
      _xent(labels, 7.0 * cos),
      rtol=1e-5,
      atol=1e-5,
  )
  np.testing.assert_allclose(
      om.arcface(labels, cos, 0.0, 7.0), _xent(labels, 7.0 * cos), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
      om.l_softmax(labels, _concat(cos, norms), m=1),
      _xent(labels, norms * cos),
      rtol=1e-5,
      atol=1e-5,
  )
  sn = _sphere_norms(rng)
  np.testing.assert_allclose(
      om.sphereface(labels, _concat(cos, sn), m=1),
      _xent(labels, sn * cos),
      rtol=1e-5,
      atol=1e-5,
  )


# --------------------------------------------------------------------------
# numerics at theta ~ 0 and theta ~ pi
# --------------------------------------------------------------------------

EXTREME = [1.0 - 1e-7, -(1.0 - 1e-7), 1.0, -1.0]


def _extreme_inputs(rng, c_target):
  y = np.arange(8) % 3
  c = rng.uniform(-0.9, 0.9, size=(8, 3)).astype(np.float32)
  c[np.arange(8), y] = c_target
  n = rng.uniform(0.5, 2.0, size=(8, 3)).astype(np.float32)
  return y, c, n


@pytest.mark.parametrize("c_target", EXTREME)
@pytest.mark.parametrize(
    "name", ["arcface", "l_softmax_2", "l_softmax_3", "sphereface_4"]
)
def test_finite_value_and_gradient_at_extreme_angles(rng, name, c_target):
  y, c, n = _extreme_inputs(rng, c_target)
  if name.startswith("sphereface"):
    n = np.repeat(n[:, :1], 3, axis=1)
  if name == "arcface":
    fn = lambda t: om.arcface(y, t, margin=0.5, scale=1.0)  # noqa: E731
    x = c
    ref = per_example(np_arcface, c, y, margin=0.5, scale=1.0)
  else:
    m = int(name[-1])
    fn = lambda t: om.l_softmax(y, t, m=m)  # noqa: E731
    x = _concat(c, n)
    ref = per_example(np_l_softmax, c, n, y, m=m)
  x = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss = fn(x)
    total = tf.reduce_sum(loss)
  grad = tape.gradient(total, x).numpy()
  assert np.all(np.isfinite(loss.numpy()))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-4, atol=1e-3)
  # raising the target cosine lowers the loss: the gradient is informative
  g_target = grad[np.arange(8), y]
  assert np.all(g_target < 0)


# --------------------------------------------------------------------------
# labels, sample weights, reductions
# --------------------------------------------------------------------------


def _all_losses():
  return [
      (om.MulticlassHinge(variant="crammer_singer", margin=0.5), False),
      (om.MulticlassHinge(variant="weston_watkins", margin=0.5), False),
      (om.AMSoftmax(margin=0.2, scale=10.0), False),
      (om.ArcFace(margin=0.3, scale=10.0), False),
      (om.LSoftmax(m=3), True),
      (om.SphereFace(m=4), True),
  ]


@pytest.mark.parametrize("idx", range(6))
def test_sparse_and_one_hot_labels_agree(labels, cos, norms, idx):
  loss, needs_norms = _all_losses()[idx]
  y_pred = _concat(cos, norms) if needs_norms else cos
  one_hot = np.eye(C, dtype=np.float32)[labels]
  variants = [
      labels,
      labels.reshape(-1, 1),
      labels.astype(np.float32),
      one_hot,
      one_hot.astype(np.int64),
  ]
  values = [float(loss(v, y_pred)) for v in variants]
  np.testing.assert_allclose(values, values[0], rtol=1e-6)
  # the labels matter (guards against label-independent bugs)
  assert abs(float(loss((labels + 1) % C, y_pred)) - values[0]) > 1e-3


def test_bad_label_shapes_raise(cos):
  with pytest.raises(ValueError, match="Labels must be"):
    om.am_softmax(np.zeros((N, 3)), cos)
  with pytest.raises(ValueError, match="2 \\* num_classes"):
    om.l_softmax(np.zeros(N, np.int32), cos)  # odd last dim: no norms


@pytest.mark.parametrize("idx", range(6))
def test_sample_weight_and_reductions(rng, labels, cos, norms, idx):
  loss, needs_norms = _all_losses()[idx]
  y_pred = _concat(cos, norms) if needs_norms else cos
  config = loss.get_config()
  per = np.asarray(
      type(loss).from_config({**config, "reduction": "none"})(labels, y_pred)
  )
  assert per.shape == (N,)
  w = rng.uniform(0.0, 2.0, size=N).astype(np.float32)
  np.testing.assert_allclose(float(loss(labels, y_pred)), per.mean(), rtol=1e-5)
  np.testing.assert_allclose(
      float(loss(labels, y_pred, sample_weight=w)), np.sum(w * per) / N, rtol=1e-5
  )
  summed = type(loss).from_config({**config, "reduction": "sum"})
  np.testing.assert_allclose(
      float(summed(labels, y_pred, sample_weight=w)), np.sum(w * per), rtol=1e-5
  )


# --------------------------------------------------------------------------
# hyper-parameter validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: om.MulticlassHinge(variant="one_vs_rest"), "variant"),
        (lambda: om.MulticlassHinge(margin=-1.0), "margin.*non-negative"),
        (lambda: om.MulticlassHinge(margin=float("nan")), "margin.*finite"),
        (lambda: om.AMSoftmax(margin=-0.1), "margin.*non-negative"),
        (lambda: om.AMSoftmax(scale=-2.0), "scale.*positive"),
        (lambda: om.AMSoftmax(scale=0.0), "scale.*positive"),
        (lambda: om.AMSoftmax(margin="0.3"), "margin"),
        (lambda: om.ArcFace(margin=-0.5), "margin.*non-negative"),
        (lambda: om.ArcFace(margin=3.2), "margin.*out of range"),
        (lambda: om.ArcFace(scale=-1.0), "scale.*positive"),
        (lambda: om.LSoftmax(m=0), "`m`.*out of range"),
        (lambda: om.LSoftmax(m=2.5), "`m`.*integer"),
        (lambda: om.LSoftmax(m=True), "`m`"),
        (lambda: om.SphereFace(m=-4), "`m`.*out of range"),
        (lambda: om.am_softmax([0], [[0.1, 0.2]], margin=-1.0), "margin"),
        (lambda: om.arcface([0], [[0.1, 0.2]], margin=4.0), "margin.*range"),
        (lambda: om.l_softmax([0], [[0.1, 0.2, 1.0, 1.0]], m=0), "`m`"),
        (lambda: om.multiclass_hinge([0], [[0.1, 0.2]], variant="x"), "variant"),
    ],
)
def test_bad_hyper_parameters_raise(factory, match):
  with pytest.raises(ValueError, match=match):
    factory()


def test_integral_float_m_is_accepted():
  assert om.LSoftmax(m=3.0).m == 3 and isinstance(om.LSoftmax(m=3.0).m, int)


# --------------------------------------------------------------------------
# serialisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("idx", range(6))
def test_serialization_round_trip(labels, cos, norms, idx):
  loss, needs_norms = _all_losses()[idx]
  y_pred = _concat(cos, norms) if needs_norms else cos
  serialized = keras.saving.serialize_keras_object(loss)
  assert serialized["registered_name"] == f"tf_large_margin>{type(loss).__name__}"
  restored = keras.saving.deserialize_keras_object(serialized)
  assert type(restored) is type(loss)
  assert restored.get_config() == loss.get_config()
  np.testing.assert_allclose(
      float(restored(labels, y_pred)), float(loss(labels, y_pred)), rtol=1e-7
  )


def test_config_contains_hyper_parameters():
  assert (
      om.MulticlassHinge("weston_watkins", 0.3).get_config()["variant"]
      == "weston_watkins"
  )
  cfg = om.ArcFace(margin=0.25, scale=12.0, name="af").get_config()
  assert (cfg["margin"], cfg["scale"], cfg["name"]) == (0.25, 12.0, "af")
  assert om.SphereFace(m=3).get_config()["m"] == 3


# --------------------------------------------------------------------------
# training: a tiny model's loss decreases on a fixed batch
# --------------------------------------------------------------------------


def _train_head(name):
  if name.startswith("hinge"):
    return keras.layers.Dense(3, use_bias=False)
  if name == "l_softmax":
    return CosineHead(
        3, normalize_features=False, normalize_weights=False, return_norms=True
    )
  if name == "sphereface":
    return CosineHead(3, normalize_features=False, return_norms=True)
  return CosineHead(3)


TRAIN_LOSSES = {
    "hinge_cs": lambda: om.MulticlassHinge("crammer_singer"),
    "hinge_ww": lambda: om.MulticlassHinge("weston_watkins"),
    "am_softmax": lambda: om.AMSoftmax(margin=0.2, scale=10.0),
    "arcface": lambda: om.ArcFace(margin=0.3, scale=10.0),
    "l_softmax": lambda: om.LSoftmax(m=2),
    "sphereface": lambda: om.SphereFace(m=3),
}


@pytest.mark.parametrize("name", sorted(TRAIN_LOSSES))
def test_tiny_model_trains(name):
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=32)
  model = keras.Sequential(
      [keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), _train_head(name)]
  )
  loss = TRAIN_LOSSES[name]()
  model.compile(keras.optimizers.Adam(0.02), loss=loss, jit_compile=False)
  before = float(loss(y, model(x)))
  model.fit(x, y, batch_size=32, epochs=40, verbose=0, shuffle=False)
  after = float(loss(y, model(x)))
  assert np.isfinite(after)
  assert after < 0.7 * before, (before, after)


def test_hinge_with_cross_entropy_weight():
  rng = np.random.default_rng(5)
  y_pred = rng.normal(size=(6, 4)).astype("float32")
  y_true = rng.integers(0, 4, size=6)
  hinge = om.MulticlassHinge(reduction=None)(y_true, y_pred).numpy()
  xent = keras.losses.sparse_categorical_crossentropy(
      y_true, y_pred, from_logits=True
  ).numpy()
  combined = om.MulticlassHinge(cross_entropy_weight=0.3, reduction=None)
  np.testing.assert_allclose(
      combined(y_true, y_pred).numpy(), hinge + 0.3 * xent, rtol=1e-6
  )
  restored = keras.losses.deserialize(keras.losses.serialize(combined))
  assert restored.cross_entropy_weight == 0.3
  with pytest.raises(ValueError, match="cross_entropy_weight"):
    om.MulticlassHinge(cross_entropy_weight=-1.0)


@pytest.mark.parametrize(
    "loss, reference",
    [
        # Bias-free logits each loss reduces to without its margin, from the
        # head it asks for: features x, kernel w.
        (om.AMSoftmax(margin=0.0, scale=1.0), "cos"),
        (om.ArcFace(margin=0.0, scale=1.0), "cos"),
        (om.LSoftmax(m=1), "dense"),
        (om.SphereFace(m=1), "unit_weights"),
    ],
)
def test_head_config_is_the_head_the_loss_expects(rng, labels, loss, reference):
  x = rng.normal(size=(N, 6)).astype(np.float32)
  head = CosineHead(C, **type(loss).head_config)
  y_pred = head(x)
  w = head.kernel.numpy().astype(np.float64)
  xd = x.astype(np.float64)
  logits = {
      "cos": (xd / np.linalg.norm(xd, axis=1, keepdims=True))
      @ (w / np.linalg.norm(w, axis=0)),
      "dense": xd @ w,
      "unit_weights": xd @ (w / np.linalg.norm(w, axis=0)),
  }[reference]
  expected = [np_xent(logits[i], labels[i]) for i in range(N)]
  np.testing.assert_allclose(loss.call(labels, y_pred), expected, rtol=1e-4)
