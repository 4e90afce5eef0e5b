"""Eq. 10 as Keras objects: `LargeMarginLoss` (a Keras loss: the margin at the
logits) and `LayerMargin` (the margin a `tf_large_margin.MarginModel` enforces at its
layers)."""

import keras
from keras import ops

from tf_large_margin import margin_loss
from tf_large_margin import margin_penalty
from tf_large_margin import margin_scores
from tf_large_margin.labels import at_least
from tf_large_margin.labels import softmax_xent
from tf_large_margin.labels import to_one_hot


def probabilities_to_logits(probs):
  """log(p) (p floored at Keras' epsilon): logits whose softmax gives back ``probs``."""
  return ops.log(at_least(probs, keras.config.epsilon()))


class MarginSettings:
  """Eq. 10's hyper-parameters, shared by `LargeMarginLoss` and `LayerMargin`.

  ``set_margin_settings`` validates and stores them; the arguments are those of
  `tf_large_margin.large_margin`, plus ``shrinkage``, ``aggregation`` and
  ``correct_only`` (see `LargeMarginLoss`).
  """

  def set_margin_settings(
      self,
      gamma,
      alpha_factor,
      top_k,
      dist_norm,
      epsilon,
      use_approximation,
      worst_case_loss,
      shrinkage,
      aggregation,
      correct_only,
      score="probabilities",
  ):
    margin_loss.check_top_k(top_k)
    if epsilon < 0:
      raise ValueError(f"epsilon must be >= 0; got {epsilon}.")
    self.gamma = float(gamma)
    self.alpha_factor = float(alpha_factor)
    self.top_k = int(top_k)
    self.dist_norm = margin_loss.check_dist_norm(dist_norm)
    self.epsilon = float(epsilon)
    self.use_approximation = bool(use_approximation)
    self.worst_case_loss = bool(worst_case_loss)
    if isinstance(shrinkage, dict):
      shrinkage = keras.saving.deserialize_keras_object(shrinkage)
    margin_penalty.get_shrinkage(shrinkage)
    margin_penalty.check_aggregation(aggregation)
    self.shrinkage = shrinkage
    self.aggregation = aggregation
    self.correct_only = bool(correct_only)
    self.score = margin_scores.check_score(score)

  @property
  def margin_kwargs(self):
    """The margin keyword arguments of `tf_large_margin.large_margin_per_example`."""
    return dict(
        gamma=self.gamma,
        alpha_factor=self.alpha_factor,
        top_k=self.top_k,
        dist_norm=self.dist_norm,
        epsilon=self.epsilon,
        use_approximation=self.use_approximation,
        worst_case_loss=self.worst_case_loss,
        shrinkage=self.shrinkage,
        score=self.score,
    )

  def aggregated(self, margin_values, logits, one_hot):
    """Per-example margin losses times the aggregation's weights.

    All weights are 1 for the default mean over the batch; see
    `tf_large_margin.margin_penalty.aggregation_weights`.
    """
    if self.aggregation == "mean" and not self.correct_only:
      return margin_values
    correct = None
    if self.correct_only:
      correct = ops.equal(ops.argmax(logits, axis=1), ops.argmax(one_hot, axis=1))
    return margin_values * margin_penalty.aggregation_weights(
        margin_values, correct, self.aggregation
    )

  def margin_config(self):
    """The settings as config entries (a callable shrinkage serialised)."""
    config = dict(
        self.margin_kwargs, aggregation=self.aggregation, correct_only=self.correct_only
    )
    if callable(self.shrinkage):
      config["shrinkage"] = keras.saving.serialize_keras_object(self.shrinkage)
    return config


@keras.saving.register_keras_serializable(package="tf_large_margin")
class LargeMarginLoss(MarginSettings, keras.losses.Loss):
  """Large-margin loss of Elsayed et al. 2018 (Eq. 10) at the logits, plus optional
  cross-entropy: a Keras loss for any classifier.

  With p = softmax(logits),

      d_j = (p_y - p_j) / (epsilon + || d(p_y - p_j) / d logits ||_q)
      loss = sum_j [relu(gamma - max(d_j, gamma (1 - alpha_factor))) - gamma]
             + cross_entropy_weight * crossentropy(y, logits)

  over the ``top_k`` most probable classes j != y (only the smallest d_j with
  ``worst_case_loss``), q the dual norm of ``dist_norm``. The gradient w.r.t. the
  logits is analytic, so no tape is needed: the loss runs under every Keras backend
  (TensorFlow, JAX, PyTorch). The margin at the input or at hidden
  layers is a setting of the model instead: `tf_large_margin.MarginModel` with
  ``margin=tf_large_margin.LayerMargin(...)``.

  Example:

  >>> model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
  >>> model.compile("sgd", loss=LargeMarginLoss(gamma=1., dist_norm=2,
  ...                                           cross_entropy_weight=1.))

  Args:
    gamma, alpha_factor, top_k, epsilon, use_approximation, worst_case_loss: as
      `tf_large_margin.large_margin` (same defaults).
    dist_norm: 1, 2 or np.inf (also "inf").
    cross_entropy_weight: weight of the softmax cross-entropy added to the margin
      loss (0.0: pure margin loss, as the original MNIST configuration).
    from_logits: True (default): ``y_pred`` are logits. False: ``y_pred`` are
      probabilities (e.g. after a softmax layer); their logarithm is used as the
      logits (softmax(log p) = p), so the margin is the one of the logits the
      softmax was applied to.
    shrinkage: how distances become losses (survey Eq. 6's r; loss = -r(d)):
      "clip" (the original, clip into [gamma (1 - alpha_factor), gamma]),
      "identity" or a callable r(distances, gamma, alpha_factor) (register it with
      `keras.saving.register_keras_serializable` to save the loss).
    aggregation: over the batch, "mean" (the original), "min" (the smallest
      margin) or an integer n (the mean over the n smallest margins).
    correct_only: aggregate over correctly classified examples only.
    score: "probabilities" (default, the paper): p_y - p_j as above; "logits":
      z_y - z_j in numerator and gradient (`tf_large_margin.margin_scores`).
    reduction, name, dtype: as `keras.losses.Loss`.

  Labels may be integers ([batch] or [batch, 1]) or one-hot ([batch, classes]).
  """

  def __init__(
      self,
      gamma=10000.0,
      alpha_factor=2.0,
      top_k=1,
      dist_norm=2,
      epsilon=1e-8,
      use_approximation=True,
      worst_case_loss=True,
      cross_entropy_weight=0.0,
      from_logits=True,
      shrinkage="clip",
      aggregation="mean",
      correct_only=False,
      score="probabilities",
      reduction="sum_over_batch_size",
      name="large_margin_loss",
      dtype=None,
  ):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.set_margin_settings(
        gamma=gamma,
        alpha_factor=alpha_factor,
        top_k=top_k,
        dist_norm=dist_norm,
        epsilon=epsilon,
        use_approximation=use_approximation,
        worst_case_loss=worst_case_loss,
        shrinkage=shrinkage,
        aggregation=aggregation,
        correct_only=correct_only,
        score=score,
    )
    if cross_entropy_weight < 0:
      raise ValueError(
          f"cross_entropy_weight must be >= 0; got {cross_entropy_weight}."
      )
    self.cross_entropy_weight = float(cross_entropy_weight)
    self.from_logits = bool(from_logits)

  def logits_and_labels(self, y_true, y_pred):
    """``(logits, one_hot)`` from what Keras passes to the loss."""
    logits = y_pred if self.from_logits else probabilities_to_logits(y_pred)
    return logits, to_one_hot(y_true, logits.shape[-1], dtype=logits.dtype)

  def call(self, y_true, y_pred):
    logits, one_hot = self.logits_and_labels(y_true, y_pred)
    margin_values = self.aggregated(
        margin_loss.logit_margin_per_example(
            logits=logits, one_hot_labels=one_hot, **self.margin_kwargs
        ),
        logits,
        one_hot,
    )
    xent_values = softmax_xent(
        ops.cast(one_hot, margin_values.dtype), ops.cast(logits, margin_values.dtype)
    )
    return margin_values + self.cross_entropy_weight * xent_values

  def get_config(self):
    config = super().get_config()
    config.update(
        self.margin_config(),
        cross_entropy_weight=self.cross_entropy_weight,
        from_logits=self.from_logits,
    )
    return config


class PerExampleValues(keras.losses.Loss):
  """Keras' reduction of precomputed per-example values: ``call`` returns ``y_pred``.

  Its ``__call__(values, values, sample_weight)`` weights, reduces and scales for
  tf.distribute exactly as a compiled Keras loss would.
  """

  def call(self, y_true, y_pred):
    del y_true
    return y_pred


@keras.saving.register_keras_serializable(package="tf_large_margin")
class LayerMargin(MarginSettings):
  """Eq. 10 at a model's layers: the setting ``margin=`` of `tf_large_margin.MarginModel`.

  The model captures the activations h_l of its ``margin_layers`` in its forward
  pass and adds to its compiled loss (and ``model.losses``) the term

      mean_l margin(h_l)     (per example, as `tf_large_margin.large_margin_per_example`)

  reduced over the batch with ``reduction`` and the sample weights, as a compiled
  Keras loss is.

  >>> inputs = keras.Input((28, 28, 1))
  >>> h = keras.layers.Conv2D(8, 5, activation="relu", name="conv0")(inputs)
  >>> logits = keras.layers.Dense(10)(keras.layers.Flatten()(h))
  >>> margin = LayerMargin(gamma=1e4, alpha_factor=4., dist_norm="inf", epsilon=1e-6)
  >>> model = tlm.MarginModel(inputs, logits, margin=margin,
  ...                         margin_layers=["input", "conv0"])
  >>> model.compile("rmsprop", loss=None)  # or a cross-entropy, loss_weights=...

  Args:
    gamma, alpha_factor, top_k, dist_norm, epsilon, use_approximation,
    worst_case_loss, shrinkage, aggregation, correct_only: as `LargeMarginLoss`.
    from_logits: True (default): the model outputs logits. False: it outputs
      probabilities (a softmax) and log p is used as the logits (softmax(log p) =
      p), so the margin equals the one of the model without its softmax. A
      functional model whose output layer applies a softmax needs False.
    reduction: as `keras.losses.Loss` but not None / "none" (the term is a scalar).
    score: "probabilities" (default, the paper and the original) or "logits": Eq.
      10 on z_y - z_j, whose distance does not explode when the softmax saturates
      (`tf_large_margin.margin_scores`).
  """

  def __init__(
      self,
      gamma=10000.0,
      alpha_factor=2.0,
      top_k=1,
      dist_norm=2,
      epsilon=1e-8,
      use_approximation=True,
      worst_case_loss=True,
      shrinkage="clip",
      aggregation="mean",
      correct_only=False,
      from_logits=True,
      reduction="sum_over_batch_size",
      score="probabilities",
  ):
    self.set_margin_settings(
        gamma=gamma,
        alpha_factor=alpha_factor,
        top_k=top_k,
        dist_norm=dist_norm,
        epsilon=epsilon,
        use_approximation=use_approximation,
        worst_case_loss=worst_case_loss,
        shrinkage=shrinkage,
        aggregation=aggregation,
        correct_only=correct_only,
        score=score,
    )
    if reduction in (None, "none"):
      raise ValueError(
          "reduction must reduce the batch to a scalar (the margin term of the "
          f"model's loss); got {reduction!r}."
      )
    self.from_logits = bool(from_logits)
    self.reduction = reduction
    self._reducer = PerExampleValues(reduction=reduction, name="margin")

  def per_example(
      self, one_hot, logits, layers_list, layers_weights=None, tape=None, vjp=None
  ):
    """The [batch] margin losses at ``layers_list`` (mean over the layers), times
    the aggregation's weights; ``tape`` recorded ``logits`` from ``layers_list``
    (TensorFlow), or ``vjp`` gives the gradients at them (`margin_distances`)."""
    return self.aggregated(
        margin_loss.large_margin_per_example(
            logits=logits,
            one_hot_labels=one_hot,
            layers_list=layers_list,
            layers_weights=layers_weights,
            tape=tape,
            vjp=vjp,
            **self.margin_kwargs,
        ),
        logits,
        one_hot,
    )

  def reduce(self, values, sample_weight=None):
    """The per-example ``values`` reduced as a compiled Keras loss: weighted by
    ``sample_weight``, reduced with ``reduction``, divided by the number of
    tf.distribute replicas."""
    return self._reducer(values, values, sample_weight=sample_weight)

  def get_config(self):
    return dict(
        self.margin_config(), from_logits=self.from_logits, reduction=self.reduction
    )

  @classmethod
  def from_config(cls, config):
    return cls(**config)

  def __repr__(self):
    settings = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
    return f"LayerMargin({settings})"
