"""Tests for tf_large_margin.layers.CosineHead."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_large_margin as tlm  # noqa: E402
from tf_large_margin.layers import (  # noqa: E402
    CosineHead,
    HeadOutputAccuracy,
    HeadOutputLogits,
    accuracy_metric,
    head_output_accuracy,
    head_output_logits,
    logits_model,
    returns_head_output,
    split_head_output,
)

D, C = 7, 4


@pytest.fixture
def x():
  return np.random.default_rng(0).normal(size=(10, D)).astype(np.float32)


def _np_head(x, w, normalize_features, normalize_weights):
  """Reference: (cos, scale) with cos = <x/|x|, w_j/|w_j|>."""
  x = x.astype(np.float64)
  w = w.astype(np.float64)
  xn = np.linalg.norm(x, axis=-1, keepdims=True)
  wn = np.linalg.norm(w, axis=0, keepdims=True)
  cos = (x / xn) @ (w / wn)
  scale = np.ones_like(cos)
  if not normalize_features:
    scale = scale * xn
  if not normalize_weights:
    scale = scale * wn
  return cos, scale


CONFIGS = [(True, True), (False, True), (True, False), (False, False)]


@pytest.mark.parametrize("nf, nw", CONFIGS)
def test_output_matches_numpy(x, nf, nw):
  head = CosineHead(C, normalize_features=nf, normalize_weights=nw)
  out = head(x).numpy()
  cos, scale = _np_head(x, head.kernel.numpy(), nf, nw)
  assert out.shape == (10, C)
  np.testing.assert_allclose(out, cos * scale, rtol=1e-5, atol=1e-5)
  if nf and nw:
    assert np.all(np.abs(out) <= 1.0)


def test_unnormalised_head_is_bias_free_dense(x):
  head = CosineHead(C, normalize_features=False, normalize_weights=False)
  np.testing.assert_allclose(head(x), x @ head.kernel.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nf, nw", CONFIGS)
def test_return_norms_layout(x, nf, nw):
  head = CosineHead(C, normalize_features=nf, normalize_weights=nw, return_norms=True)
  out = head(x)
  assert tuple(out.shape) == (10, 2 * C)
  cos, scale = split_head_output(out)
  ref_cos, ref_scale = _np_head(x, head.kernel.numpy(), nf, nw)
  np.testing.assert_allclose(cos, ref_cos, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scale, ref_scale, rtol=1e-5, atol=1e-6)
  # same weights without return_norms give exactly cos * scale
  plain = CosineHead(C, normalize_features=nf, normalize_weights=nw)
  plain.build(x.shape)
  plain.kernel.assign(head.kernel)
  np.testing.assert_allclose(head_output_logits(out), plain(x), rtol=1e-6, atol=1e-6)


def test_cosine_is_clipped_at_parallel_vectors():
  head = CosineHead(3)
  head.build((None, D))
  w = head.kernel.numpy()
  x = np.stack([5.0 * w[:, 0], -0.3 * w[:, 1], w[:, 2]]).astype(np.float32)
  out = head(x).numpy()
  assert out.max() <= 1.0 and out.min() >= -1.0
  np.testing.assert_allclose(np.diag(out), [1.0, -1.0, 1.0], atol=1e-6)


def test_zero_input_has_finite_output_and_gradient():
  head = CosineHead(C, normalize_features=True)
  x = tf.zeros((2, D))
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = head(x)
    total = tf.reduce_sum(out)
  grads = tape.gradient(total, [x, head.kernel])
  assert np.all(np.isfinite(out.numpy()))
  assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_higher_rank_inputs_and_output_shape():
  head = CosineHead(C, return_norms=True)
  x = np.random.default_rng(1).normal(size=(2, 3, D)).astype(np.float32)
  out = head(x)
  assert tuple(out.shape) == (2, 3, 2 * C)
  np.testing.assert_allclose(out[1, 2], head(x[1, 2][None])[0], rtol=1e-6, atol=1e-6)
  sym = CosineHead(C)(keras.Input((5, D)))
  assert tuple(sym.shape) == (None, 5, C)
  assert CosineHead(C, return_norms=True).compute_output_shape((None, D)) == (
      None,
      2 * C,
  )


@pytest.mark.parametrize("units", [0, -3, 2.5, True, "4", None])
def test_bad_units_raise(units):
  with pytest.raises(ValueError, match="units"):
    CosineHead(units)


def test_split_rejects_odd_width():
  with pytest.raises(ValueError, match="odd"):
    split_head_output(np.zeros((2, 5), np.float32))


def test_config_round_trip():
  head = CosineHead(
      6,
      normalize_features=False,
      normalize_weights=True,
      return_norms=True,
      kernel_initializer=keras.initializers.RandomNormal(stddev=0.3),
      kernel_regularizer=keras.regularizers.L2(1e-3),
      name="cos_head",
  )
  config = head.get_config()
  assert config["units"] == 6
  assert (
      config["normalize_features"],
      config["normalize_weights"],
      config["return_norms"],
  ) == (
      False,
      True,
      True,
  )
  clone = CosineHead.from_config(config)
  assert clone.get_config() == config
  serialized = keras.saving.serialize_keras_object(head)
  assert serialized["registered_name"] == "tf_large_margin>CosineHead"
  restored = keras.saving.deserialize_keras_object(serialized)
  assert isinstance(restored, CosineHead) and restored.get_config() == config


def test_regularizer_is_applied(x):
  head = CosineHead(C, kernel_regularizer=keras.regularizers.L2(0.5))
  head(x)
  assert len(head.losses) == 1
  np.testing.assert_allclose(
      float(head.losses[0]), 0.5 * np.sum(head.kernel.numpy() ** 2), rtol=1e-5
  )


@pytest.mark.parametrize(
    "head_kwargs, loss",
    [
        ({}, tlm.ArcFace(margin=0.3, scale=8.0)),
        (
            {
                "normalize_features": False,
                "normalize_weights": False,
                "return_norms": True,
            },
            tlm.LSoftmax(m=2),
        ),
    ],
)
def test_keras_file_round_trip(tmp_path, x, head_kwargs, loss):
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
      [
          keras.Input((D,)),
          keras.layers.Dense(5, activation="relu"),
          CosineHead(C, **head_kwargs),
      ]
  )
  model.compile(keras.optimizers.SGD(0.01), loss=loss, jit_compile=False)
  y = np.arange(len(x)) % C
  model.train_on_batch(x, y)  # non-initial weights, built optimizer
  path = tmp_path / "model.keras"
  model.save(path)
  loaded = keras.saving.load_model(path)
  np.testing.assert_array_equal(
      loaded.predict(x, verbose=0), model.predict(x, verbose=0)
  )
  assert isinstance(loaded.layers[-1], CosineHead)
  assert loaded.layers[-1].get_config() == model.layers[-1].get_config()
  assert type(loaded.loss) is type(loss)
  assert loaded.loss.get_config() == loss.get_config()


# --------------------------------------------------------------------------
# Accuracy, logits and models of [cos, scale] heads
# --------------------------------------------------------------------------


def _head_output_and_labels(seed=0, n=64):
  """[cos, scale] with cosines in [-1, 1], positive scales and labels; the
  argmax over all 2C columns is a scale column (never a class)."""
  rng = np.random.default_rng(seed)
  cos = rng.uniform(-1.0, 1.0, size=(n, C))
  scale = rng.uniform(1.5, 3.0, size=(n, C))
  labels = rng.integers(0, C, size=n)
  return np.concatenate([cos, scale], 1).astype(np.float32), labels


def test_head_output_accuracy_is_argmax_of_logits():
  y_pred, labels = _head_output_and_labels()
  correct = np.argmax(y_pred[:, :C] * y_pred[:, C:], axis=1) == labels
  assert 0.1 < correct.mean() < 0.9
  for y_true in (labels, labels[:, None], labels.astype(np.float32), np.eye(C)[labels]):
    np.testing.assert_array_equal(head_output_accuracy(y_true, y_pred), correct)
  metric = HeadOutputAccuracy()
  assert metric.name == "accuracy"
  metric.update_state(labels[:40], y_pred[:40])
  metric.update_state(labels[40:], y_pred[40:])
  assert float(metric.result()) == pytest.approx(correct.mean())
  weights = np.random.default_rng(1).uniform(size=len(labels))
  metric.reset_state()
  metric.update_state(labels, y_pred, sample_weight=weights)
  assert float(metric.result()) == pytest.approx(
      np.sum(weights * correct) / np.sum(weights), rel=1e-6
  )
  # Keras' accuracy on the raw [cos, scale] output is not the accuracy.
  plain = keras.metrics.SparseCategoricalAccuracy()
  plain.update_state(labels, y_pred)
  assert float(plain.result()) == 0.0


def test_head_output_accuracy_serialization():
  metric = HeadOutputAccuracy(name="acc")
  serialized = keras.saving.serialize_keras_object(metric)
  assert serialized["registered_name"] == "tf_large_margin>HeadOutputAccuracy"
  restored = keras.saving.deserialize_keras_object(serialized)
  assert isinstance(restored, HeadOutputAccuracy) and restored.name == "acc"
  y_pred, labels = _head_output_and_labels()
  restored.update_state(labels, y_pred)
  assert float(restored.result()) == pytest.approx(
      float(np.mean(head_output_accuracy(labels, y_pred)))
  )


def _head_model(return_norms):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((D,))
  hidden = keras.layers.Dense(6, activation="tanh")(inputs)
  head = CosineHead(C, normalize_features=False, return_norms=return_norms, name="head")
  return keras.Model(inputs, head(hidden))


def test_logits_model_and_accuracy_metric(x):
  plain = _head_model(return_norms=False)
  assert not returns_head_output(plain)
  assert logits_model(plain) is plain
  assert accuracy_metric(plain) == "accuracy"
  model = _head_model(return_norms=True)
  assert returns_head_output(model)
  assert isinstance(accuracy_metric(model), HeadOutputAccuracy)
  logits = logits_model(model)
  assert tuple(logits.output.shape) == (None, C)
  np.testing.assert_allclose(logits(x), head_output_logits(model(x)), rtol=1e-6)
  # The same layers: the logits follow the trained weights.
  assert logits.layers[-2] is model.layers[-1]
  plain.set_weights(model.get_weights())
  np.testing.assert_allclose(logits(x), plain(x), rtol=1e-5, atol=1e-6)
  assert HeadOutputLogits().compute_output_shape((None, 2 * C)) == (None, C)


def test_compiled_head_output_accuracy_trains_and_round_trips(tmp_path, x):
  model = _head_model(return_norms=True)
  labels = np.arange(len(x)) % C
  model.compile(
      keras.optimizers.Adam(1e-2),
      loss=tlm.SphereFace(m=2),
      metrics=[accuracy_metric(model)],
  )
  history = model.fit(x, labels, epochs=3, verbose=0).history
  assert set(history) == {"loss", "accuracy"}
  expected = np.mean(np.argmax(logits_model(model)(x), axis=1) == labels)
  result = model.evaluate(x, labels, verbose=0, return_dict=True)
  assert result["accuracy"] == pytest.approx(expected)
  model.save(tmp_path / "model.keras")
  loaded = keras.saving.load_model(tmp_path / "model.keras")
  assert loaded.evaluate(x, labels, verbose=0, return_dict=True)[
      "accuracy"
  ] == pytest.approx(expected)
  np.testing.assert_allclose(logits_model(loaded)(x), logits_model(model)(x), rtol=1e-6)
