"""Adversarial training: the batch holds the attacked examples; it composes with the
margin loss; configuration and errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import adversarial
from tf_large_margin import attacks

DIM = 6


def network(model_class=adversarial.AdversarialMarginModel, **kwargs):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((DIM,))
  h = keras.layers.Dense(16, activation="relu", name="h")(inputs)
  return model_class(inputs, keras.layers.Dense(3)(h), **kwargs)


def cross_entropy():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=32):
  rng = np.random.default_rng(0)
  return rng.uniform(0.0, 1.0, size=(n, DIM)).astype("float32"), rng.integers(0, 3, n)


class Recording(adversarial.AdversarialMarginModel):
  """Records the inputs the margin step sees (run eagerly)."""

  def total_loss(self, x, y, sample_weight=None, training=False):
    if training:
      self.seen.append((np.array(x), np.array(y)))
    return super().total_loss(x, y, sample_weight, training)


@pytest.mark.parametrize(
    "attack_kwargs",
    [
        dict(attack="fgsm", epsilon=0.1),
        dict(attack="pgd", epsilon=0.3, norm=2, steps=3, seed=7),
    ],
)
def test_the_margin_step_sees_the_clean_and_the_attacked_examples(attack_kwargs):
  model = network(
      Recording,
      margin=tlm.LayerMargin(gamma=1.0),
      margin_layers=["input", "h"],
      **attack_kwargs,
  )
  model.seen = []
  model.compile(keras.optimizers.SGD(0.1), loss=cross_entropy(), run_eagerly=True)
  x, y = data(8)
  if attack_kwargs["attack"] == "fgsm":
    expected = attacks.fgsm(model, x, y, 0.1)
  else:  # step t = 0 uses the seed (seed, 0)
    expected = attacks.pgd(model, x, y, 0.3, norm=2, steps=3, seed=(7, 0))
  before = [w.numpy() for w in model.trainable_weights]
  model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  ((seen_x, seen_y),) = model.seen
  np.testing.assert_array_equal(seen_x[:8], x)
  np.testing.assert_allclose(seen_x[8:], expected, atol=1e-6)
  assert not np.allclose(seen_x[8:], x)
  np.testing.assert_array_equal(seen_y, np.concatenate([y, y]))
  assert any(not np.allclose(b, w) for b, w in zip(before, model.trainable_weights))


def test_adversarial_batch_with_one_hot_labels_and_sample_weights():
  model = network(attack="iterative_fgsm", epsilon=0.2, steps=4)
  model.compile(keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
  x, y = data(5)
  one_hot, weights = tf.one_hot(y, 3), tf.range(5, dtype=tf.float32)
  batch_x, batch_y, batch_w = model.adversarial_batch((x, one_hot, weights))
  np.testing.assert_allclose(
      batch_x[5:], attacks.iterative_fgsm(model, x, y, 0.2, steps=4), atol=1e-6
  )
  np.testing.assert_array_equal(batch_y, tf.concat([one_hot, one_hot], 0))
  np.testing.assert_array_equal(batch_w, [0, 1, 2, 3, 4] * 2)


def test_compiled_fit_with_the_margin_and_plain_cross_entropy():
  x, y = data(64)
  for margin in (tlm.LayerMargin(gamma=1.0), None):
    model = network(
        margin=margin,
        margin_layers=["input", "h"],
        attack="pgd",
        epsilon=0.1,
        steps=2,
    )
    model.compile(keras.optimizers.Adam(1e-2), loss=cross_entropy())
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_from_model_and_save_load(tmp_path):
  keras.utils.set_random_seed(0)
  base = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(3)])
  model = adversarial.AdversarialMarginModel.from_model(
      base,
      margin=tlm.LayerMargin(gamma=1.0, dist_norm="inf"),
      attack="pgd",
      epsilon=0.3,
      norm=2,
      steps=5,
  )
  assert model.attack_config["attack"] == "pgd" and model.attack_config["norm"] == 2
  model.compile("sgd", loss=None)
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, adversarial.AdversarialMarginModel)
  assert loaded.attack_config == model.attack_config
  assert loaded.margin.get_config() == model.margin.get_config()
  x, _ = data(4)
  np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attack="deepfool"), "attack must be one of"),
        (dict(epsilon=0.0), "epsilon must be > 0"),
        (dict(epsilon=-1.0), "epsilon must be finite and >= 0"),
        (dict(norm=1), "norm must be 2 or np.inf"),
        (dict(attack="fgsm", norm=2), "norm=2 needs attack='pgd'"),
        (dict(attack="pgd", steps=0), "steps"),
        (dict(clip_min=1.0, clip_max=0.0), "clip_min must be < clip_max"),
    ],
)
def test_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    network(**kwargs)
