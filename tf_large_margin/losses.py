"""The large-margin loss as a drop-in Keras loss."""

import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import margin_loss
from tf_large_margin.labels import to_one_hot


def probabilities_to_logits(probs):
  """log(p) (p floored at Keras' epsilon): logits whose softmax gives back ``probs``."""
  return tf.math.log(tf.maximum(probs, keras.config.epsilon()))


@keras.saving.register_keras_serializable(package="tf_large_margin")
class LargeMarginLoss(keras.losses.Loss):
  """Large-margin loss of Elsayed et al. 2018 (Eq. 10), plus optional cross-entropy.

  In ``model.compile(loss=LargeMarginLoss(...))`` of a plain Keras model the margin
  is enforced in logit space: with p = softmax(logits),

      d_j = (p_y - p_j) / (epsilon + || d(p_y - p_j) / d logits ||_q)
      loss = sum_j [relu(gamma - max(d_j, gamma (1 - alpha_factor))) - gamma]
             + cross_entropy_weight * crossentropy(y, logits)

  over the ``top_k`` most probable classes j != y (only the smallest d_j with
  ``worst_case_loss``), q the dual norm of ``dist_norm``. The gradient w.r.t. the
  logits is analytic, so no tape is needed. Compiled into a
  `tf_large_margin.MarginModel`, the same object carries the hyper-parameters and the
  margin is enforced at the model's ``margin_layers`` (input, hidden layers) instead.

  Example:

  >>> model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
  >>> model.compile("sgd", loss=LargeMarginLoss(gamma=1., dist_norm=2,
  ...                                           cross_entropy_weight=1.))

  Args:
    gamma, alpha_factor, top_k, dist_norm, epsilon, use_approximation,
    worst_case_loss: as `tf_large_margin.large_margin` (same defaults).
    cross_entropy_weight: weight of the softmax cross-entropy added to the margin
      loss (0.0: pure margin loss, as the original MNIST configuration).
    from_logits: True (default): ``y_pred`` are logits. False: ``y_pred`` are
      probabilities (e.g. after a softmax layer); their logarithm is used as the
      logits (softmax(log p) = p), so the margin is measured in log-probability
      space.
    shrinkage: how distances become losses (survey Eq. 6's r; loss = -r(d)):
      "clip" (the original, clip into [gamma (1 - alpha_factor), gamma]),
      "identity" or a callable r(distances, gamma, alpha_factor) (register it with
      `keras.saving.register_keras_serializable` to save the loss).
    aggregation: over the batch, "mean" (the original), "min" (the smallest
      margin) or an integer n (the mean over the n smallest margins).
    correct_only: aggregate over correctly classified examples only.
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
      reduction="sum_over_batch_size",
      name="large_margin_loss",
      dtype=None,
  ):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    margin_loss.dual_norm(dist_norm)
    margin_loss.check_top_k(top_k)
    if cross_entropy_weight < 0:
      raise ValueError(
          f"cross_entropy_weight must be >= 0; got {cross_entropy_weight}."
      )
    if epsilon < 0:
      raise ValueError(f"epsilon must be >= 0; got {epsilon}.")
    self.gamma = float(gamma)
    self.alpha_factor = float(alpha_factor)
    self.top_k = int(top_k)
    self.dist_norm = float(dist_norm) if dist_norm == np.inf else int(dist_norm)
    self.epsilon = float(epsilon)
    self.use_approximation = bool(use_approximation)
    self.worst_case_loss = bool(worst_case_loss)
    self.cross_entropy_weight = float(cross_entropy_weight)
    self.from_logits = bool(from_logits)
    if isinstance(shrinkage, dict):
      shrinkage = keras.saving.deserialize_keras_object(shrinkage)
    margin_loss.get_shrinkage(shrinkage)
    margin_loss.check_aggregation(aggregation)
    self.shrinkage = shrinkage
    self.aggregation = aggregation
    self.correct_only = bool(correct_only)

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
    )

  def logits_and_labels(self, y_true, y_pred):
    """``(logits, one_hot)`` from what Keras passes to the loss."""
    logits = y_pred if self.from_logits else probabilities_to_logits(y_pred)
    return logits, to_one_hot(y_true, logits.shape[-1], dtype=logits.dtype)

  def per_example_parts(
      self, one_hot, logits, layers_list=None, layers_weights=None, tape=None
  ):
    """``(margin, crossentropy)`` per example, both [batch].

    The margin values carry the aggregation's per-example weights (all 1 for the
    default mean over the batch).

    With ``layers_list`` None the margin is taken at the logits (analytic
    gradient); otherwise at the given layers, as `tf_large_margin.large_margin`
    (``tape``: the tape that recorded ``logits`` from ``layers_list``).
    """
    if layers_list is None:
      margin_values = margin_loss.logit_margin_per_example(
          logits=logits, one_hot_labels=one_hot, **self.margin_kwargs
      )
    else:
      margin_values = margin_loss.large_margin_per_example(
          logits=logits,
          one_hot_labels=one_hot,
          layers_list=layers_list,
          layers_weights=layers_weights,
          tape=tape,
          **self.margin_kwargs,
      )
    if self.aggregation != "mean" or self.correct_only:
      correct = None
      if self.correct_only:
        correct = tf.equal(tf.argmax(logits, axis=1), tf.argmax(one_hot, axis=1))
      margin_values *= margin_loss.aggregation_weights(
          margin_values, correct, self.aggregation
      )
    xent_values = tf.nn.softmax_cross_entropy_with_logits(
        labels=tf.cast(one_hot, margin_values.dtype),
        logits=tf.cast(logits, margin_values.dtype),
    )
    return margin_values, xent_values

  def call(self, y_true, y_pred):
    logits, one_hot = self.logits_and_labels(y_true, y_pred)
    margin_values, xent_values = self.per_example_parts(one_hot, logits)
    return margin_values + self.cross_entropy_weight * xent_values

  def get_config(self):
    config = super().get_config()
    config.update(
        self.margin_kwargs,
        cross_entropy_weight=self.cross_entropy_weight,
        from_logits=self.from_logits,
        aggregation=self.aggregation,
        correct_only=self.correct_only,
    )
    if callable(self.shrinkage):
      config["shrinkage"] = keras.saving.serialize_keras_object(self.shrinkage)
    return config
