"""Jacobian margin regulariser of Sokolic et al. (Eq. 26).

Sokolic, Giryes, Sapiro, Rodrigues, "Robust Large Margin Deep Neural Networks",
IEEE Trans. Signal Processing 2017. For a network f(x) = V^T phi(x) whose last layer
is linear with class rows v_c, the input-space margin is bounded below through the
Jacobian J(x) = d phi(x) / dx of the feature map. The regulariser penalises

    R = (lambda / N) sum_i || (v_i / ||v_i||_2)^T J(x_i) ||_2

with v_i either a row of V drawn at random per example ("random") or every row in
turn, summed ("all"). Each term is one vector-Jacobian product per example and
class direction (no full Jacobians). The paper also penalises the classifier
matrix, mu ||V||_F^2.

Half-precision features (mixed precision, float16 or bfloat16) are cast to float32
while the tape records, so the penalty and its norms are computed in float32. The
norms use the subgradient 0 at 0 (`safe_norm`): an example whose feature Jacobian
vanishes (a dead ReLU layer) adds 0 to the penalty and to its gradient, not NaN.
"""

from typing import NamedTuple

import keras
import tensorflow as tf

from tf_large_margin.labels import working_dtype
from tf_large_margin.margin_loss import safe_norm
from tf_large_margin.models import TotalLossStep
from tf_large_margin.models import layer_outputs_model
from tf_large_margin.models import scale_for_replicas
from tf_large_margin.models import unscale_for_replicas

VARIANTS = ("random", "all")


def jacobian_penalty(inputs, features, classifier_kernel, tape, class_indices=None):
  """sum_i || (v / ||v||_2)^T J(x_i) ||_2 over the batch, J = d features / d inputs.

  The norms use `safe_norm` (subgradient 0 where v^T J(x_i) = 0), and a zero
  classifier row v contributes 0 (v / ||v||_2 is taken as 0). With half-precision
  features the directions and norms are computed in float32 (`working_dtype`): the
  cotangents are cast to the dtype of ``features``, the Jacobian rows to float32.
  Under mixed precision, better cast the features to float32 while ``tape``
  records (as `JacobianModel` does), so that the vector-Jacobian products start
  from float32 cotangents.

  Args:
    inputs: [batch, ...] tensor watched by ``tape``.
    features: [batch, F] feature map recorded by ``tape`` from ``inputs``.
    classifier_kernel: [F, classes] kernel of the linear classifier (rows v_c are
      its columns).
    tape: the `tf.GradientTape` that recorded ``features`` (persistent for
      ``class_indices=None``). For the penalty's gradient w.r.t. the weights, call
      this while an outer tape records.
    class_indices: [batch] int class per example ("random" variant), or None to
      sum over all classes ("all" variant).

  Returns:
    A scalar: the sum over the batch (and classes), in ``working_dtype(features)``.
  """
  dtype = working_dtype(features.dtype)
  kernel = tf.cast(classifier_kernel, dtype)
  directions = tf.transpose(  # [C, F]
      tf.math.divide_no_nan(kernel, safe_norm(kernel, axis=0, keepdims=True))
  )
  directions = tf.cast(directions, features.dtype)
  if class_indices is None:
    cotangents = [
        tf.broadcast_to(direction, tf.shape(features))
        for direction in tf.unstack(directions)
    ]
  else:
    cotangents = [tf.gather(directions, class_indices)]
  total = 0.0
  for cotangent in cotangents:
    rows = tape.gradient(features, inputs, output_gradients=cotangent)
    if rows is None:
      raise ValueError(
          "The features do not depend on the inputs (gradient None): "
          "the tape must watch the inputs and record the features."
      )
    rows = tf.cast(tf.reshape(rows, [tf.shape(rows)[0], -1]), dtype)
    total += tf.reduce_sum(safe_norm(rows, axis=1))
  return total


class JacobianActivations(NamedTuple):
  """What the penalty needs from the forward pass: the watched ``inputs``, the
  ``features`` (float32 for half precision) and the persistent ``tape`` that
  recorded them."""

  inputs: tf.Tensor
  features: tf.Tensor
  tape: tf.GradientTape


@keras.saving.register_keras_serializable(package="tf_large_margin")
class JacobianModel(TotalLossStep, keras.Model):
  """A functional model trained with the Jacobian regulariser of Sokolic et al.

  The step minimises the compiled loss (multi-class hinge as the paper, or
  cross-entropy) plus ``(jacobian_weight / batch) * jacobian_penalty`` plus
  ``classifier_weight * ||V||_F^2``; the logs report ``jacobian``.

  >>> inputs = keras.Input((28, 28, 1))
  >>> h = keras.layers.Flatten()(keras.layers.Conv2D(8, 5, activation="relu")(inputs))
  >>> logits = keras.layers.Dense(10)(keras.layers.Dense(32, name="features")(h))
  >>> model = JacobianModel(inputs, logits, feature_layer="features",
  ...                       jacobian_weight=0.1)

  Args:
    feature_layer: name of the layer whose output phi(x) feeds the classifier.
    jacobian_weight: lambda (divided by the batch size, as the paper).
    variant: "random" (one random class row per example) or "all" (sum over rows).
    classifier_weight: mu of the classifier matrix penalty mu ||V||_F^2.
    seed: seed of the random class draws.
    *args, **kwargs: as `keras.Model` (``inputs``, ``outputs``, ``name``). The
      output layer must be a `keras.layers.Dense` applied to the features.
  """

  def __init__(
      self,
      *args,
      feature_layer,
      jacobian_weight=0.1,
      variant="random",
      classifier_weight=0.0,
      seed=None,
      **kwargs,
  ):
    super().__init__(*args, **kwargs)
    if variant not in VARIANTS:
      raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}.")
    for name, value in (
        ("jacobian_weight", jacobian_weight),
        ("classifier_weight", classifier_weight),
    ):
      if not value >= 0:
        raise ValueError(f"{name} must be >= 0; got {value!r}.")
    self.feature_layer = feature_layer
    self.jacobian_weight = float(jacobian_weight)
    self.variant = variant
    self.classifier_weight = float(classifier_weight)
    self.seed = seed
    self._seed_generator = keras.random.SeedGenerator(seed)
    self.jacobian_tracker = keras.metrics.Mean(name="jacobian")
    if len(self.inputs) != 1:
      raise ValueError(f"JacobianModel needs one input; got {len(self.inputs)}.")
    endpoints = layer_outputs_model(self, [feature_layer])
    classifier = self.layers[-1]
    features = endpoints.outputs[1]
    if not isinstance(classifier, keras.layers.Dense) or (
        classifier.input is not features
    ):
      raise ValueError(
          f"The output layer must be a Dense layer applied to {feature_layer!r} (the "
          f"linear classifier); got {type(classifier).__name__} {classifier.name!r}."
      )
    object.__setattr__(self, "_endpoints", endpoints)
    object.__setattr__(self, "_classifier", classifier)

  def _class_indices(self, batch_size, num_classes):
    if self.variant == "all":
      return None
    return keras.random.randint(
        [batch_size], 0, num_classes, seed=self._seed_generator, dtype="int32"
    )

  def term_trackers(self):
    return [self.jacobian_tracker]

  def forward_pass(self, x, training=False):
    """One forward pass: ``(logits, JacobianActivations)``."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      logits, features = self._endpoints(x, training=training)
      # Mixed precision: the cast is recorded, so the vector-Jacobian products of
      # the penalty start from float32 cotangents and reach x through it.
      features = tf.cast(features, working_dtype(features.dtype))
    return logits, JacobianActivations(x, features, tape)

  def compute_loss(
      self,
      x=None,
      y=None,
      y_pred=None,
      sample_weight=None,
      training=True,
      activations=None,
  ):
    """Keras' loss (compiled loss and ``model.losses``) + Jacobian penalty +
    classifier penalty; updates the ``jacobian`` tracker.

    ``activations``: the `JacobianActivations` of the forward pass that gave
    ``y_pred`` (the training step passes them); None: a forward pass on ``x``.
    """
    loss = self.keras_loss(x, y, y_pred, sample_weight, training=training)
    if activations is None:
      _, activations = self.forward_pass(x, training=training)
    inputs, features, tape = activations
    kernel = self._classifier.kernel
    batch_size = tf.shape(inputs)[0]
    penalty = jacobian_penalty(
        inputs,
        features,
        kernel,
        tape,
        self._class_indices(batch_size, kernel.shape[-1]),
    )
    penalty = tf.cast(penalty, tf.float32)
    penalty = scale_for_replicas(
        self.jacobian_weight * penalty / tf.cast(batch_size, tf.float32)
    )
    total = tf.cast(loss, tf.float32) + penalty
    if self.classifier_weight:
      total += scale_for_replicas(
          self.classifier_weight * tf.reduce_sum(tf.square(tf.cast(kernel, tf.float32)))
      )
    self.jacobian_tracker.update_state(
        unscale_for_replicas(penalty), sample_weight=batch_size
    )
    return total

  def get_config(self):
    config = super().get_config()
    config.update(
        feature_layer=self.feature_layer,
        jacobian_weight=self.jacobian_weight,
        variant=self.variant,
        classifier_weight=self.classifier_weight,
        seed=self.seed,
    )
    return config
