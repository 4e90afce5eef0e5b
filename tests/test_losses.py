"""LargeMarginLoss as a plain Keras loss; LayerMargin, the model's margin setting."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import margin_loss
from tf_large_margin import margin_scores

rng = np.random.default_rng(0)
LOGITS = rng.normal(size=(8, 5)).astype("float32") * 2
LABELS = rng.integers(0, 5, size=8)
KWARGS = dict(gamma=0.4, alpha_factor=3.0, top_k=3, dist_norm=1, worst_case_loss=False)


def per_example_reference(logits, labels, xent_weight=0.0):
  """Eq. 10 at the logits with explicit per-example tapes, plus cross-entropy."""
  values = []
  for b in range(len(labels)):
    z = tf.constant(logits[b : b + 1])
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(z)
      out = z * 1.0
    values.append(
        margin_loss.large_margin(
            logits=out,
            one_hot_labels=tf.one_hot(labels[b : b + 1], 5),
            layers_list=[out],
            tape=tape,
            **KWARGS
        ).numpy()
    )
  xent = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
  return np.array(values) + xent_weight * xent.numpy()


def test_value_equals_large_margin_at_logits_per_example():
  loss = tlm.LargeMarginLoss(reduction=None, cross_entropy_weight=0.3, **KWARGS)
  np.testing.assert_allclose(
      loss(LABELS, LOGITS).numpy(),
      per_example_reference(LOGITS, LABELS, 0.3),
      rtol=1e-5,
  )


def test_sparse_column_and_one_hot_labels_agree():
  loss = tlm.LargeMarginLoss(**KWARGS)
  expected = loss(LABELS, LOGITS).numpy()
  np.testing.assert_allclose(loss(LABELS[:, None], LOGITS).numpy(), expected)
  np.testing.assert_allclose(loss(np.eye(5)[LABELS], LOGITS).numpy(), expected)


def test_sample_weight_and_reductions():
  per_example = per_example_reference(LOGITS, LABELS)
  weights = np.linspace(0, 1, 8).astype("float32")
  for reduction, expected in [
      ("sum_over_batch_size", np.sum(per_example * weights) / 8),
      ("sum", np.sum(per_example * weights)),
      ("mean_with_sample_weight", np.sum(per_example * weights) / weights.sum()),
  ]:
    loss = tlm.LargeMarginLoss(reduction=reduction, **KWARGS)
    np.testing.assert_allclose(
        loss(LABELS, LOGITS, sample_weight=weights).numpy(), expected, rtol=1e-5
    )


def test_from_logits_false_takes_log_probabilities():
  probs = tf.nn.softmax(LOGITS).numpy()
  on_probs = tlm.LargeMarginLoss(from_logits=False, reduction=None, **KWARGS)
  on_log_probs = tlm.LargeMarginLoss(reduction=None, **KWARGS)
  np.testing.assert_allclose(
      on_probs(LABELS, probs).numpy(),
      on_log_probs(LABELS, np.log(probs)).numpy(),
      rtol=1e-5,
  )


def test_compile_fit_save_load(tmp_path):
  x = rng.normal(size=(64, 10)).astype("float32")
  y = (x[:, 0] > 0).astype("int64") + 2 * (x[:, 1] > 0)
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
      [
          keras.Input((10,)),
          keras.layers.Dense(16, activation="relu"),
          keras.layers.Dense(4),
      ]
  )
  model.compile(
      keras.optimizers.Adam(1e-2),
      loss=tlm.LargeMarginLoss(gamma=1.0, dist_norm=np.inf, top_k=2),
  )
  history = model.fit(x, y, epochs=20, verbose=0).history["loss"]
  assert history[-1] < history[0] - 0.1
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert loaded.loss.get_config() == model.loss.get_config()
  assert loaded.loss.dist_norm == np.inf
  np.testing.assert_allclose(
      loaded.evaluate(x, y, verbose=0), model.evaluate(x, y, verbose=0), rtol=1e-6
  )


@pytest.mark.parametrize("score", ["probabilities", "logits"])
def test_serialization_round_trip(score):
  loss = tlm.LargeMarginLoss(
      cross_entropy_weight=0.5, from_logits=False, score=score, **KWARGS
  )
  restored = keras.losses.deserialize(keras.losses.serialize(loss))
  assert isinstance(restored, tlm.LargeMarginLoss)
  assert restored.get_config() == loss.get_config()
  assert restored.score == score and restored.margin_kwargs["score"] == score


def test_logit_score_changes_the_loss_value():
  """The score reaches the computation: at saturated probabilities the two differ."""
  logits = tf.constant([[9.0, 1.0, 0.0], [0.5, 0.0, 3.0]])
  labels = tf.constant([0, 2])
  values = [
      float(tlm.LargeMarginLoss(gamma=100.0, dist_norm=2, score=s)(labels, logits))
      for s in ("probabilities", "logits")
  ]
  assert abs(values[0] - values[1]) > 1e-3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dist_norm=0), "dist_norm"),
        (dict(top_k=0), "top_k"),
        (dict(cross_entropy_weight=-1.0), "cross_entropy_weight"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(score="logit"), "score must be one of"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tlm.LargeMarginLoss(**kwargs)


def test_bad_labels_and_top_k():
  with pytest.raises(
      ValueError, match=r"Labels must be integer class ids.*got shape \(8, 3\)"
  ):
    tlm.LargeMarginLoss()(np.zeros((8, 3)), LOGITS)
  with pytest.raises(ValueError, match=r"top_k must be in \[1, num_classes=5\]"):
    tlm.LargeMarginLoss(top_k=6)(LABELS, LOGITS)


class TestAggregation:
  """Survey Eq. 6 options: shrinkage r, aggregation over T, T = correct examples."""

  def per_example(self, **kwargs):
    return tlm.LargeMarginLoss(reduction=None, **KWARGS, **kwargs)(
        LABELS, LOGITS
    ).numpy()

  def test_defaults_are_the_original(self):
    np.testing.assert_array_equal(
        self.per_example(shrinkage="clip", aggregation="mean", correct_only=False),
        self.per_example(),
    )

  def test_min_picks_the_smallest_margin(self):
    losses = self.per_example()
    value = tlm.LargeMarginLoss(aggregation="min", **KWARGS)(LABELS, LOGITS)
    np.testing.assert_allclose(value.numpy(), losses.max(), rtol=1e-6)

  def test_n_smallest_margins(self):
    losses = self.per_example()
    value = tlm.LargeMarginLoss(aggregation=3, **KWARGS)(LABELS, LOGITS)
    np.testing.assert_allclose(value.numpy(), np.sort(losses)[-3:].mean(), rtol=1e-6)

  def test_correct_only_ignores_misclassified(self):
    losses = self.per_example()
    correct = LOGITS.argmax(axis=1) == LABELS
    assert 0 < correct.sum() < len(LABELS)
    value = tlm.LargeMarginLoss(correct_only=True, **KWARGS)(LABELS, LOGITS)
    np.testing.assert_allclose(value.numpy(), losses[correct].mean(), rtol=1e-6)
    value = tlm.LargeMarginLoss(correct_only=True, aggregation="min", **KWARGS)(
        LABELS, LOGITS
    )
    np.testing.assert_allclose(value.numpy(), losses[correct].max(), rtol=1e-6)

  def test_identity_shrinkage_is_minus_distance(self):
    z = tf.constant(LOGITS)
    probs = tf.nn.softmax(z)
    diff, competitors = margin_scores.top_k_probability_differences(
        probs, tf.one_hot(LABELS, 5), 3
    )
    grads = margin_scores.probability_difference_cotangents(
        probs, tf.one_hot(LABELS, 5), competitors
    )
    norms = np.stack([np.abs(g.numpy()).max(axis=1) for g in grads], axis=1)  # linf
    distances = diff.numpy() / (norms + 1e-8)
    np.testing.assert_allclose(
        self.per_example(shrinkage="identity"), -distances.sum(axis=1), rtol=1e-5
    )

  def test_callable_shrinkage_serialises(self):
    loss = tlm.LargeMarginLoss(shrinkage=half_distance, **KWARGS)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert restored.shrinkage is half_distance
    np.testing.assert_allclose(
        restored(LABELS, LOGITS).numpy(),
        tlm.LargeMarginLoss(shrinkage="identity", **KWARGS)(LABELS, LOGITS).numpy() / 2,
        rtol=1e-6,
    )

  @pytest.mark.parametrize(
      "kwargs,match",
      [
          (dict(aggregation="median"), "aggregation"),
          (dict(aggregation=0), "aggregation"),
          (dict(shrinkage="tanh"), "shrinkage"),
      ],
  )
  def test_bad_options(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      tlm.LargeMarginLoss(**kwargs)


@keras.saving.register_keras_serializable(package="tf_large_margin_tests")
def half_distance(distances, gamma, alpha_factor):
  del gamma, alpha_factor
  return distances / 2


def test_out_of_range_class_ids_raise():
  with pytest.raises(tf.errors.InvalidArgumentError, match="class ids must be < 5"):
    tlm.LargeMarginLoss()(np.array([0, 5, 1, 2, 3, 4, 0, 1]), LOGITS)
  with pytest.raises(tf.errors.InvalidArgumentError, match="class ids must be >= 0"):
    tlm.LargeMarginLoss()(np.array([0, -1, 1, 2, 3, 4, 0, 1]), LOGITS)


@pytest.mark.parametrize("dist_norm", ["inf", np.inf, float("inf"), np.float64(np.inf)])
def test_dist_norm_inf_in_every_spelling(dist_norm):
  loss = tlm.LargeMarginLoss(reduction=None, **dict(KWARGS, dist_norm=dist_norm))
  assert loss.dist_norm == np.inf and loss.get_config()["dist_norm"] == np.inf
  reference = tlm.LargeMarginLoss(reduction=None, **dict(KWARGS, dist_norm=np.inf))
  np.testing.assert_array_equal(loss(LABELS, LOGITS), reference(LABELS, LOGITS))
  assert tlm.LayerMargin(dist_norm=dist_norm).dist_norm == np.inf


class TestLayerMargin:
  """The model's margin setting: validation, serialisation, its reduction."""

  def test_settings_and_serialisation(self):
    margin = tlm.LayerMargin(
        gamma=2.0, dist_norm="inf", shrinkage=half_distance, from_logits=False,
        score="logits",
    )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(margin)
    )
    assert isinstance(restored, tlm.LayerMargin)
    assert restored.shrinkage is half_distance
    assert restored.get_config() == margin.get_config()
    loss = tlm.LargeMarginLoss(
        gamma=2.0, dist_norm=np.inf, shrinkage=half_distance, score="logits"
    )
    assert margin.margin_kwargs == loss.margin_kwargs
    assert restored.score == "logits"

  def test_reduce_is_keras_reduction(self):
    values = np.linspace(-1.0, 1.0, 8).astype("float32")
    weights = np.linspace(0.0, 2.0, 8).astype("float32")
    for reduction, expected in [
        ("sum_over_batch_size", np.sum(values * weights) / 8),
        ("sum", np.sum(values * weights)),
        ("mean_with_sample_weight", np.sum(values * weights) / weights.sum()),
    ]:
      margin = tlm.LayerMargin(reduction=reduction)
      np.testing.assert_allclose(
          margin.reduce(values, sample_weight=weights), expected, rtol=1e-6
      )

  @pytest.mark.parametrize(
      "kwargs,match",
      [
          (dict(dist_norm=3), "dist_norm"),
          (dict(dist_norm="l2"), "dist_norm"),
          (dict(top_k=0), "top_k"),
          (dict(epsilon=-1.0), "epsilon"),
          (dict(aggregation="median"), "aggregation"),
          (dict(shrinkage="tanh"), "shrinkage"),
          (dict(reduction=None), "reduction must reduce the batch"),
          (dict(reduction="none"), "reduction must reduce the batch"),
          (dict(reduction="max"), "reduction"),
      ],
  )
  def test_bad_settings(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      tlm.LayerMargin(**kwargs)
