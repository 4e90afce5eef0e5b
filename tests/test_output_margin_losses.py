"""Tests for all output-margin losses together (numbers checked against numpy).

Reduction to cross-entropy, extreme angles, labels, reductions, validation,
serialisation and training.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import additive_margin_losses
from tf_large_margin import hinge_loss
from tf_large_margin import multiplicative_margin_losses
from tf_large_margin import schedules
from tf_large_margin.layers import CosineHead
from output_margin_reference import (  # pylint: disable=unused-import
    keras_xent,
    N,
    C,
    np_xent,
    np_arcface,
    np_l_softmax,
    per_example,
    rng,
    labels,
    cos,
    norms,
    head_output,
    sphere_norms,
)


def test_margins_make_the_loss_larger(labels, cos, norms):
  base = np.asarray(
      additive_margin_losses.am_softmax(labels, cos, margin=0.0, scale=8.0)
  )
  assert np.all(
      np.asarray(additive_margin_losses.am_softmax(labels, cos, 0.3, 8.0)) > base
  )
  assert np.all(
      np.asarray(additive_margin_losses.arcface(labels, cos, 0.3, 8.0)) > base
  )
  y_pred = head_output(cos, norms)
  base = np.asarray(multiplicative_margin_losses.l_softmax(labels, y_pred, m=1))
  bigger = np.asarray(multiplicative_margin_losses.l_softmax(labels, y_pred, m=3))
  assert np.all(bigger >= base - 1e-5) and np.mean(bigger > base + 1e-3) > 0.9


# --------------------------------------------------------------------------
# reduction to plain softmax cross-entropy
# --------------------------------------------------------------------------


def test_reduce_to_cross_entropy(rng, labels, cos, norms):
  ref = keras_xent(labels, cos)
  np.testing.assert_allclose(
      additive_margin_losses.am_softmax(labels, cos, 0.0, 1.0),
      ref,
      rtol=1e-5,
      atol=1e-6,
  )
  np.testing.assert_allclose(
      additive_margin_losses.arcface(labels, cos, 0.0, 1.0), ref, rtol=1e-5, atol=1e-6
  )
  # the scale alone is just a temperature
  np.testing.assert_allclose(
      additive_margin_losses.am_softmax(labels, cos, 0.0, 7.0),
      keras_xent(labels, 7.0 * cos),
      rtol=1e-5,
      atol=1e-5,
  )
  np.testing.assert_allclose(
      additive_margin_losses.arcface(labels, cos, 0.0, 7.0),
      keras_xent(labels, 7.0 * cos),
      rtol=1e-5,
      atol=1e-5,
  )
  np.testing.assert_allclose(
      multiplicative_margin_losses.l_softmax(labels, head_output(cos, norms), m=1),
      keras_xent(labels, norms * cos),
      rtol=1e-5,
      atol=1e-5,
  )
  sn = sphere_norms(rng)
  np.testing.assert_allclose(
      multiplicative_margin_losses.sphereface(labels, head_output(cos, sn), m=1),
      keras_xent(labels, sn * cos),
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
    fn = lambda t: additive_margin_losses.arcface(y, t, margin=0.5, scale=1.0)  # noqa: E731
    x = c
    ref = per_example(np_arcface, c, y, margin=0.5, scale=1.0)
  else:
    m = int(name[-1])
    fn = lambda t: multiplicative_margin_losses.l_softmax(y, t, m=m)  # noqa: E731
    x = head_output(c, n)
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
      (hinge_loss.MulticlassHinge(variant="crammer_singer", margin=0.5), False),
      (hinge_loss.MulticlassHinge(variant="weston_watkins", margin=0.5), False),
      (additive_margin_losses.AMSoftmax(margin=0.2, scale=10.0), False),
      (additive_margin_losses.ArcFace(margin=0.3, scale=10.0), False),
      (multiplicative_margin_losses.LSoftmax(m=3), True),
      (multiplicative_margin_losses.SphereFace(m=4), True),
      (multiplicative_margin_losses.LSoftmax(m=2, lambda_=2.5), True),
      (
          multiplicative_margin_losses.SphereFace(
              m=4, lambda_=schedules.LambdaDecay(10.0, 0.5, 1.0, 1.0)
          ),
          True,
      ),
  ]


NUM_LOSSES = len(_all_losses())


@pytest.mark.parametrize("idx", range(NUM_LOSSES))
def test_sparse_and_one_hot_labels_agree(labels, cos, norms, idx):
  loss, needs_norms = _all_losses()[idx]
  y_pred = head_output(cos, norms) if needs_norms else cos
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
    additive_margin_losses.am_softmax(np.zeros((N, 3)), cos)
  with pytest.raises(ValueError, match="2 \\* num_classes"):
    multiplicative_margin_losses.l_softmax(
        np.zeros(N, np.int32), cos
    )  # odd last dim: no norms


@pytest.mark.parametrize("idx", range(NUM_LOSSES))
def test_sample_weight_and_reductions(rng, labels, cos, norms, idx):
  loss, needs_norms = _all_losses()[idx]
  y_pred = head_output(cos, norms) if needs_norms else cos
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
        (lambda: hinge_loss.MulticlassHinge(variant="one_vs_rest"), "variant"),
        (lambda: hinge_loss.MulticlassHinge(margin=-1.0), "margin.*non-negative"),
        (lambda: hinge_loss.MulticlassHinge(margin=float("nan")), "margin.*finite"),
        (lambda: additive_margin_losses.AMSoftmax(margin=-0.1), "margin.*non-negative"),
        (lambda: additive_margin_losses.AMSoftmax(scale=-2.0), "scale.*positive"),
        (lambda: additive_margin_losses.AMSoftmax(scale=0.0), "scale.*positive"),
        (lambda: additive_margin_losses.AMSoftmax(margin="0.3"), "margin"),
        (lambda: additive_margin_losses.ArcFace(margin=-0.5), "margin.*non-negative"),
        (lambda: additive_margin_losses.ArcFace(margin=3.2), "margin.*out of range"),
        (lambda: additive_margin_losses.ArcFace(scale=-1.0), "scale.*positive"),
        (lambda: multiplicative_margin_losses.LSoftmax(m=0), "`m`.*out of range"),
        (lambda: multiplicative_margin_losses.LSoftmax(m=2.5), "`m`.*integer"),
        (lambda: multiplicative_margin_losses.LSoftmax(m=True), "`m`"),
        (lambda: multiplicative_margin_losses.SphereFace(m=-4), "`m`.*out of range"),
        (
            lambda: additive_margin_losses.am_softmax([0], [[0.1, 0.2]], margin=-1.0),
            "margin",
        ),
        (
            lambda: additive_margin_losses.arcface([0], [[0.1, 0.2]], margin=4.0),
            "margin.*range",
        ),
        (
            lambda: multiplicative_margin_losses.l_softmax(
                [0], [[0.1, 0.2, 1.0, 1.0]], m=0
            ),
            "`m`",
        ),
        (
            lambda: hinge_loss.multiclass_hinge([0], [[0.1, 0.2]], variant="x"),
            "variant",
        ),
    ],
)
def test_bad_hyper_parameters_raise(factory, match):
  with pytest.raises(ValueError, match=match):
    factory()


def test_integral_float_m_is_accepted():
  assert multiplicative_margin_losses.LSoftmax(m=3.0).m == 3 and isinstance(
      multiplicative_margin_losses.LSoftmax(m=3.0).m, int
  )


# --------------------------------------------------------------------------
# serialisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("idx", range(NUM_LOSSES))
def test_serialization_round_trip(labels, cos, norms, idx):
  loss, needs_norms = _all_losses()[idx]
  y_pred = head_output(cos, norms) if needs_norms else cos
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
      hinge_loss.MulticlassHinge("weston_watkins", 0.3).get_config()["variant"]
      == "weston_watkins"
  )
  cfg = additive_margin_losses.ArcFace(margin=0.25, scale=12.0, name="af").get_config()
  assert (cfg["margin"], cfg["scale"], cfg["name"]) == (0.25, 12.0, "af")
  assert multiplicative_margin_losses.SphereFace(m=3).get_config()["m"] == 3


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
    "hinge_cs": lambda: hinge_loss.MulticlassHinge("crammer_singer"),
    "hinge_ww": lambda: hinge_loss.MulticlassHinge("weston_watkins"),
    "am_softmax": lambda: additive_margin_losses.AMSoftmax(margin=0.2, scale=10.0),
    "arcface": lambda: additive_margin_losses.ArcFace(margin=0.3, scale=10.0),
    "l_softmax": lambda: multiplicative_margin_losses.LSoftmax(m=2),
    "sphereface": lambda: multiplicative_margin_losses.SphereFace(m=3),
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


@pytest.mark.parametrize(
    "loss, reference",
    [
        # Bias-free logits each loss reduces to without its margin, from the
        # head it asks for: features x, kernel w.
        (additive_margin_losses.AMSoftmax(margin=0.0, scale=1.0), "cos"),
        (additive_margin_losses.ArcFace(margin=0.0, scale=1.0), "cos"),
        (multiplicative_margin_losses.LSoftmax(m=1), "dense"),
        (multiplicative_margin_losses.SphereFace(m=1), "unit_weights"),
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
