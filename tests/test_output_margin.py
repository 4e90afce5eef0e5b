"""Tests for tf_large_margin.output_margin (numbers checked against numpy)."""

import json
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
      (om.LSoftmax(m=2, lambda_=2.5), True),
      (om.SphereFace(m=4, lambda_=om.LambdaDecay(10.0, 0.5, 1.0, 1.0)), True),
  ]


NUM_LOSSES = len(_all_losses())


@pytest.mark.parametrize("idx", range(NUM_LOSSES))
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


@pytest.mark.parametrize("idx", range(NUM_LOSSES))
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


@pytest.mark.parametrize("idx", range(NUM_LOSSES))
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


# --------------------------------------------------------------------------
# L-Softmax / SphereFace lambda annealing
# --------------------------------------------------------------------------


def np_l_softmax_annealed(c, norms, y, m, lam):
  """Target logit (lam ||w|| ||x|| cos + ||w|| ||x|| psi) / (1 + lam), as written."""
  logits = np.array(norms, np.float64) * np.array(c, np.float64)
  psi, _ = np_psi_k(np.arccos(np.clip(c[y], -1.0, 1.0)), m)
  logits[y] = (lam * norms[y] * c[y] + norms[y] * psi) / (1.0 + lam)
  return np_xent(logits, y)


def np_lambda_decay(step, base, gamma, power, lambda_min):
  return max(lambda_min, base * (1.0 + gamma * step) ** (-power))


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0, 100.0])
def test_annealed_l_softmax_matches_numpy(rng, labels, cos, norms, m, lam):
  expected = per_example(np_l_softmax_annealed, cos, norms, labels, m=m, lam=lam)
  y_pred = _concat(cos, norms)
  for got in (
      om.l_softmax(labels, y_pred, m=m, lambda_=lam),
      om.l_softmax(labels, y_pred, m=m, lambda_=tf.constant(lam)),
      om.LSoftmax(m=m, lambda_=lam, reduction="none")(labels, y_pred),
  ):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  sn = _sphere_norms(rng)
  y_pred = _concat(cos, sn)
  expected = per_example(np_l_softmax_annealed, cos, sn, labels, m=m, lam=lam)
  np.testing.assert_allclose(
      om.SphereFace(m=m, lambda_=lam, reduction="none")(labels, y_pred),
      expected,
      rtol=1e-5,
      atol=1e-4,
  )


def test_lambda_zero_is_the_unannealed_loss(labels, cos, norms):
  y_pred = _concat(cos, norms)
  for m in (2, 4):
    plain = np.asarray(om.l_softmax(labels, y_pred, m=m))
    np.testing.assert_array_equal(om.l_softmax(labels, y_pred, m=m, lambda_=0), plain)
    np.testing.assert_array_equal(
        om.LSoftmax(m=m, lambda_=0.0, reduction="none")(labels, y_pred), plain
    )
  assert om.LSoftmax().lambda_ == 0.0 and om.SphereFace().lambda_ == 0.0
  assert om.LSoftmax().step is None


@pytest.mark.parametrize("fn", [om.l_softmax, om.sphereface])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_lambda_to_infinity_is_softmax_cross_entropy(rng, labels, cos, norms, fn, m):
  if fn is om.sphereface:
    norms = _sphere_norms(rng)
  y_pred = _concat(cos, norms)
  ref = _xent(labels, norms * cos)
  np.testing.assert_allclose(
      fn(labels, y_pred, m=m, lambda_=1e12), ref, rtol=1e-5, atol=1e-5
  )
  # ... and the loss falls monotonically towards it as lambda grows (psi <= cos)
  values = [np.asarray(fn(labels, y_pred, m=m, lambda_=lam)) for lam in (0, 1, 10, 1e3)]
  for smaller, larger in zip(values[1:], values[:-1]):
    assert np.all(smaller <= larger + 1e-5)
  assert np.all(values[-1] >= ref - 1e-5)


def test_lambda_decay_values():
  steps = [0, 1, 2, 10, 100, 1000, 10_000, 100_000]
  for params in [
      (1000.0, 0.12, 1.0, 5.0),  # SphereFace
      (1000.0, 0.12, 1.0, 0.0),
      (100.0, 0.01, 2.0, 0.5),
      (7.0, 0.0, 1.0, 0.0),  # gamma = 0: constant
      (50.0, 1.0, 0.0, 1.0),  # power = 0: constant
  ]:
    schedule = om.LambdaDecay(*params)
    got = [float(schedule(tf.constant(s, tf.int64))) for s in steps]
    expected = [np_lambda_decay(s, *params) for s in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
  default = om.LambdaDecay()
  assert (default.base, default.gamma, default.power, default.lambda_min) == (
      1000.0,
      0.12,
      1.0,
      5.0,
  )
  assert float(default(0)) == 1000.0 and float(default(10**6)) == 5.0


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: om.LSoftmax(lambda_=-1.0), "lambda_.*non-negative"),
        (lambda: om.SphereFace(lambda_=float("inf")), "lambda_.*finite"),
        (lambda: om.SphereFace(lambda_=float("nan")), "lambda_.*finite"),
        (lambda: om.LSoftmax(lambda_="1000"), "lambda_.*schedule"),
        (lambda: om.LSoftmax(lambda_=True), "lambda_"),
        (lambda: om.LSoftmax(lambda_=lambda step: 1.0), "lambda_.*schedule"),
        (lambda: om.l_softmax([0], [[0.1, 0.2, 1.0, 1.0]], lambda_=-2.0), "lambda_"),
        (
            lambda: om.sphereface(
                [0], [[0.1, 0.2, 1.0, 1.0]], lambda_=om.LambdaDecay()
            ),
            "not a schedule",
        ),
        (lambda: om.LambdaDecay(base=-1.0), "base.*non-negative"),
        (lambda: om.LambdaDecay(gamma=-0.1), "gamma.*non-negative"),
        (lambda: om.LambdaDecay(power=-1.0), "power.*non-negative"),
        (lambda: om.LambdaDecay(lambda_min=-5.0), "lambda_min.*non-negative"),
        (lambda: om.LambdaDecay(gamma=float("nan")), "gamma.*finite"),
        (lambda: om.LambdaDecay(base="1000"), "base"),
        (lambda: om.LambdaDecay(base=10.0, lambda_min=20.0), "lambda_min.*base"),
    ],
)
def test_bad_lambda_raises(factory, match):
  with pytest.raises(ValueError, match=match):
    factory()


def _annealing_model(loss_cls, seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6,))
  features = keras.layers.Dense(8, activation="tanh")(inputs)
  model = keras.Model(
      inputs, CosineHead(3, name="head", **loss_cls.head_config)(features)
  )
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=16)
  return model, x, y


# Steep, so that consecutive steps have clearly different lambdas:
# 1000, 8.3, 2.3, 1.04, 0.59, 0.38.
STEEP = dict(base=1000.0, gamma=10.0, power=2.0, lambda_min=0.0)


@pytest.mark.parametrize("loss_cls", [om.LSoftmax, om.SphereFace])
def test_lambda_schedule_advances_during_fit(loss_cls):
  """With learning rate 0 the weights stay fixed, so the loss logged for the
  one-step epoch i is the loss at lambda(i): the compiled train function reads
  the current step, not the value it was traced with."""
  model, x, y = _annealing_model(loss_cls)
  schedule = om.LambdaDecay(**STEEP)
  loss = loss_cls(m=2, lambda_=schedule)
  model.compile(keras.optimizers.SGD(0.0), loss=loss, jit_compile=False)
  epochs = 5
  history = model.fit(
      x,
      y,
      batch_size=16,
      epochs=epochs,
      verbose=0,
      shuffle=False,
      callbacks=[om.LambdaScheduler()],
  )
  output = model(x)
  lambdas = [np_lambda_decay(i, **STEEP) for i in range(epochs)]
  expected = [float(loss_cls(m=2, lambda_=lam)(y, output)) for lam in lambdas]
  np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-5)
  assert expected[0] < 0.9 * expected[-1]  # lambda made a difference
  # the logs record the lambda of each epoch's (last) step
  np.testing.assert_allclose(history.history["lambda"], lambdas, rtol=1e-6)
  # after fit the loss is at the optimizer's step
  assert int(loss.step) == int(model.optimizer.iterations) == epochs
  np.testing.assert_allclose(
      float(loss.current_lambda()), np_lambda_decay(epochs, **STEEP), rtol=1e-6
  )

  # Without the callback the schedule stays at step 0 (lambda = base).
  model, x, y = _annealing_model(loss_cls)
  loss = loss_cls(m=2, lambda_=om.LambdaDecay(**STEEP))
  model.compile(keras.optimizers.SGD(0.0), loss=loss, jit_compile=False)
  history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
  assert int(loss.step) == 0
  np.testing.assert_allclose(history.history["loss"], [expected[0]] * 3, rtol=1e-5)


def test_lambda_scheduler_with_keras_schedule_and_several_steps_per_epoch():
  """Any Keras schedule works as lambda_; the step is the optimizer's step
  (not the epoch), and the losses in a dict of losses are found."""
  model, x, y = _annealing_model(om.SphereFace)
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [50.0, 0.0])
  loss = om.SphereFace(m=4, lambda_=schedule)
  model.compile(keras.optimizers.SGD(0.0), loss={"head": loss}, jit_compile=False)
  history = model.fit(
      x,
      y,
      batch_size=4,  # 4 steps per epoch
      epochs=2,
      verbose=0,
      shuffle=False,
      callbacks=[om.LambdaScheduler()],
  )
  output = model(x)
  per_batch = [
      [
          float(om.SphereFace(m=4, lambda_=lam)(y[i : i + 4], output[i : i + 4]))
          for i in range(0, 16, 4)
      ]
      for lam in (50.0, 0.0)
  ]
  # PiecewiseConstantDecay: lambda 50 at steps <= 2, 0 from step 3 on
  epoch1 = np.mean(per_batch[0][:3] + per_batch[1][3:])
  epoch2 = np.mean(per_batch[1])
  np.testing.assert_allclose(history.history["loss"], [epoch1, epoch2], rtol=1e-5)
  assert int(loss.step) == 8
  assert history.history["lambda"] == [0.0, 0.0]  # at steps 3 and 7


def test_annealed_loss_serialization_and_resumed_schedule(tmp_path):
  """model.save / load_model keep the schedule; the loaded loss starts at step 0
  and LambdaScheduler resynchronises it with the restored optimizer step."""
  model, x, y = _annealing_model(om.LSoftmax)
  loss = om.LSoftmax(m=3, lambda_=om.LambdaDecay(**STEEP), name="ls")
  model.compile(keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
  model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[om.LambdaScheduler()])
  assert int(loss.step) == 4
  path = tmp_path / "annealed.keras"
  model.save(path)
  restored = keras.saving.load_model(path)
  assert type(restored.loss) is om.LSoftmax
  assert restored.loss.get_config() == loss.get_config()
  assert isinstance(restored.loss.lambda_, om.LambdaDecay)
  assert restored.loss.lambda_.get_config() == STEEP
  assert int(restored.loss.step) == 0
  restored.fit(
      x, y, batch_size=8, epochs=1, verbose=0, callbacks=[om.LambdaScheduler()]
  )
  assert int(restored.optimizer.iterations) == 6 and int(restored.loss.step) == 6

  for lambda_ in (
      om.LambdaDecay(1.0, 2.0, 3.0, 0.5),
      keras.optimizers.schedules.ExponentialDecay(100.0, 10, 0.5),
      4.0,
  ):
    original = om.SphereFace(m=3, lambda_=lambda_)
    serialized = keras.saving.serialize_keras_object(original)
    json.dumps(serialized)  # JSON-compatible
    copy = keras.saving.deserialize_keras_object(serialized)
    assert type(copy) is om.SphereFace and copy.get_config() == original.get_config()
    for step in (0, 7):
      if copy.step is not None:
        copy.step.assign(step)
        original.step.assign(step)
      np.testing.assert_allclose(
          float(copy.current_lambda()), float(original.current_lambda())
      )


def test_lambda_scheduler_ignores_constant_lambdas():
  model, x, y = _annealing_model(om.LSoftmax)
  model.compile("adam", loss=om.LSoftmax(m=2, lambda_=3.0), jit_compile=False)
  history = model.fit(x, y, epochs=1, verbose=0, callbacks=[om.LambdaScheduler()])
  assert "lambda" not in history.history
  model, x, y = _annealing_model(om.LSoftmax)
  model.compile("adam", loss="mse", jit_compile=False)
  model.fit(x, np.zeros((16, 6)), epochs=1, verbose=0, callbacks=[om.LambdaScheduler()])


def test_lambda_scheduler_with_two_scheduled_losses_and_explicit_losses():
  inputs = keras.Input((6,))
  features = keras.layers.Dense(8, activation="tanh")(inputs)
  a = CosineHead(3, name="a", **om.LSoftmax.head_config)(features)
  b = CosineHead(3, name="b", **om.SphereFace.head_config)(features)
  model = keras.Model(inputs, {"a": a, "b": b})
  losses = {
      "a": om.LSoftmax(lambda_=om.LambdaDecay(**STEEP), name="ls"),
      "b": om.SphereFace(lambda_=om.LambdaDecay(10.0, 1.0, 1.0, 0.0), name="sf"),
  }
  model.compile(keras.optimizers.SGD(0.0), loss=losses, jit_compile=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=16)
  history = model.fit(
      x,
      {"a": y, "b": y},
      batch_size=8,
      epochs=2,
      verbose=0,
      callbacks=[om.LambdaScheduler()],
  )
  np.testing.assert_allclose(
      history.history["ls_lambda"],
      [np_lambda_decay(s, **STEEP) for s in (1, 3)],
      rtol=1e-6,
  )
  np.testing.assert_allclose(history.history["sf_lambda"], [5.0, 2.5], rtol=1e-6)
  # only the losses given are updated
  losses["a"].step.assign(0)
  model.fit(
      x,
      {"a": y, "b": y},
      batch_size=8,
      epochs=1,
      verbose=0,
      callbacks=[om.LambdaScheduler(losses=[losses["b"]])],
  )
  assert int(losses["a"].step) == 0 and int(losses["b"].step) == 6


@pytest.mark.parametrize("loss_cls", [om.LSoftmax, om.SphereFace])
def test_annealing_trains_where_the_plain_loss_may_not(loss_cls):
  """A tiny model trains with the annealed loss (loss and accuracy improve)."""
  model, x, y = _annealing_model(loss_cls)
  loss = loss_cls(lambda_=om.LambdaDecay(100.0, 0.5, 1.0, 1.0))
  model.compile(keras.optimizers.Adam(0.02), loss=loss, jit_compile=False)
  before = float(loss_cls(lambda_=1.0)(y, model(x)))
  model.fit(x, y, batch_size=16, epochs=40, verbose=0, callbacks=[om.LambdaScheduler()])
  np.testing.assert_allclose(float(loss.current_lambda()), 100.0 / 21.0, rtol=1e-5)
  after = float(loss_cls(lambda_=1.0)(y, model(x)))
  assert np.isfinite(after) and after < 0.7 * before, (before, after)
