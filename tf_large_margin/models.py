"""`MarginModel`: a Keras model whose training step enforces the margin at hidden layers."""

import math

import keras
import tensorflow as tf

# Keras' own loss reduction (sample weights, reductions, the 1/replicas scaling of
# tf.distribute) so that the margin step reduces exactly as `model.compile` losses.
from keras.src.losses.loss import reduce_weighted_values
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.trainers.data_adapters.data_adapter_utils import (
    unpack_x_y_sample_weight,
)

from tf_large_margin import distribute
from tf_large_margin import margin_loss
from tf_large_margin.labels import to_one_hot
from tf_large_margin.losses import LargeMarginLoss

INPUT = "input"
SIZE = "size"


def layer_outputs_model(model, names):
  """A functional model sharing ``model``'s layers that returns its single output
  (the logits) followed by the outputs of the layers ``names``.

  Raises ValueError for several model outputs, an unknown name, a layer called
  several times (ambiguous output) or a layer with several outputs.
  """
  if len(model.outputs) != 1:
    raise ValueError(
        f"The model needs one output (the logits); got {len(model.outputs)}."
    )
  outputs = []
  for name in names:
    try:
      layer = model.get_layer(name)
    except ValueError:
      known = ", ".join(repr(l.name) for l in model.layers)
      raise ValueError(
          f"Unknown layer {name!r}: the model's layers are {known} (or 'input')."
      ) from None
    if len(layer._inbound_nodes) != 1:  # pylint: disable=protected-access
      raise ValueError(
          f"Layer {name!r} is called several times in the model, so "
          "its output is ambiguous."
      )
    if not keras.backend.is_keras_tensor(layer.output):
      raise ValueError(
          f"Layer {name!r} has several outputs; one tensor per layer is needed."
      )
    outputs.append(layer.output)
  return keras.Model(
      model.inputs, [model.outputs[0]] + outputs, name=f"{model.name}_endpoints"
  )


class TotalLossStep(distribute.MultiWorkerFit):
  """Mixin: Keras ``train_step`` / ``test_step`` around a model's own loss.

  Subclasses implement ``total_loss(x, y, sample_weight, training)``, returning
  ``(loss, logits)`` from one forward pass and updating their loss trackers; the
  plain Keras steps run while ``has_total_loss()`` is False.
  """

  def has_total_loss(self):
    return True

  def total_loss(self, x, y, sample_weight=None, training=False):
    raise NotImplementedError

  def train_step(self, data):
    if not self.has_total_loss():
      return distribute.logs_for_reduction(super().train_step(data))
    x, y, sample_weight = unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      loss, logits = self.total_loss(x, y, sample_weight, training=True)
      scaled_loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, self.trainable_weights)
    self.optimizer.apply(gradients, self.trainable_weights)
    return distribute.logs_for_reduction(
        self.compute_metrics(x, y, logits, sample_weight)
    )

  def test_step(self, data):
    if not self.has_total_loss():
      return distribute.logs_for_reduction(super().test_step(data))
    x, y, sample_weight = unpack_x_y_sample_weight(data)
    _, logits = self.total_loss(x, y, sample_weight, training=False)
    return distribute.logs_for_reduction(
        self.compute_metrics(x, y, logits, sample_weight)
    )


class MarginTraining(TotalLossStep):
  """Mixin with the margin training step; see `MarginModel`.

  For a subclassed model (no layer graph): ``class Net(MarginTraining,
  keras.Model)`` overriding `margin_endpoints(x, training)` to return ``(logits,
  activations)``, the activations of the names in ``margin_layers`` other than
  "input", in that order, computed in the same forward pass as the logits.
  (Subclass this mixin, not `MarginModel`: Keras rewrites the base classes of a
  `keras.Model` subclass used functionally, as `MarginModel` is.)
  """

  def __init__(self, *args, margin_layers=(INPUT,), layers_weights=None, **kwargs):
    super().__init__(*args, **kwargs)
    margin_layers = (
        [margin_layers] if isinstance(margin_layers, str) else list(margin_layers)
    )
    if not margin_layers:
      raise ValueError("margin_layers is empty: name at least one layer or 'input'.")
    if layers_weights is not None and layers_weights != SIZE:
      layers_weights = [float(w) for w in layers_weights]
      margin_loss.check_layers_weights(layers_weights, len(margin_layers))
    self.margin_layers = margin_layers
    self.layers_weights = layers_weights
    self._margin_tracker = keras.metrics.Mean(name="margin")
    self._xent_tracker = keras.metrics.Mean(name="xent")
    if hasattr(self, "_nodes"):  # functional: resolve the names now.
      self._build_endpoints()

  def _build_endpoints(self):
    """The logits and margin layers' outputs in one call (untracked by Keras)."""
    if INPUT in self.margin_layers and len(self.inputs) != 1:
      raise ValueError(
          f"'input' is ambiguous for a model with {len(self.inputs)} inputs."
      )
    names = [name for name in self.margin_layers if name != INPUT]
    object.__setattr__(self, "_endpoints", layer_outputs_model(self, names))

  def margin_endpoints(self, x, training=False):
    """One forward pass: ``(logits, [outputs of the margin layers but "input"])``.

    Functional models get it from their layer graph; subclassed models override it.
    """
    logits, *hidden = tf.nest.flatten(self._endpoints(x, training=training))
    return logits, hidden

  @property
  def margin_loss(self):
    """The compiled `LargeMarginLoss` (it switches on the margin step), or None."""
    loss = getattr(self, "loss", None)
    return loss if isinstance(loss, LargeMarginLoss) else None

  def _layers_weights(self, layers_list):
    if self.layers_weights == SIZE:
      return [float(math.prod(h.shape[1:])) for h in layers_list]
    return self.layers_weights

  def has_total_loss(self):
    return self.margin_loss is not None

  @property
  def metrics(self):
    """Keras' metrics, with ``margin`` and ``xent`` only under a margin loss."""
    metrics = super().metrics
    if self.has_total_loss():
      return metrics
    return [m for m in metrics if m not in (self._margin_tracker, self._xent_tracker)]

  def total_loss(self, x, y, sample_weight=None, training=False):
    """Total loss of one batch and its logits (the step's forward pass).

    Returns ``(total, logits)``; also updates the ``loss``, ``margin`` and
    ``xent`` trackers.
    """
    loss_fn = self.margin_loss
    x = tf.convert_to_tensor(x)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      logits, hidden = self.margin_endpoints(x, training=training)
    hidden = iter(hidden)
    layers_list = [x if name == INPUT else next(hidden) for name in self.margin_layers]
    one_hot = to_one_hot(y, logits.shape[-1])
    try:
      margin_values, xent_values = loss_fn.per_example_parts(
          one_hot,
          logits,
          layers_list=layers_list,
          layers_weights=self._layers_weights(layers_list),
          tape=tape,
      )
    except ValueError as error:
      raise ValueError(
          f"{error} layers_list is the margin_layers {self.margin_layers}."
      ) from error

    def reduce(values):
      return reduce_weighted_values(
          values,
          sample_weight=sample_weight,
          reduction=loss_fn.reduction,
          dtype="float32",
      )

    margin_loss, xent_loss = reduce(margin_values), reduce(xent_values)
    total = margin_loss + loss_fn.cross_entropy_weight * xent_loss
    for extra in self.losses:
      total += tf.cast(self._aggregate_additional_loss(extra), total.dtype)
    batch_size = tf.shape(x)[0]
    self._loss_tracker.update_state(
        unscale_loss_for_distribution(total), sample_weight=batch_size
    )
    self._margin_tracker.update_state(
        unscale_loss_for_distribution(margin_loss), sample_weight=batch_size
    )
    self._xent_tracker.update_state(
        unscale_loss_for_distribution(xent_loss), sample_weight=batch_size
    )
    return total, logits

  def get_config(self):
    config = super().get_config()
    config.update(
        margin_layers=list(self.margin_layers), layers_weights=self.layers_weights
    )
    return config


@keras.saving.register_keras_serializable(package="tf_large_margin")
class MarginModel(MarginTraining, keras.Model):
  """A Keras model trained with the large-margin loss at chosen layers (Eq. 10).

  Compile it with a `tf_large_margin.LargeMarginLoss`: its hyper-parameters reach the
  training step, which makes one forward pass returning the logits and the
  activations h_l of ``margin_layers``, and minimises

      mean_l margin(h_l) + cross_entropy_weight * crossentropy + sum(model.losses)

  (margin as `tf_large_margin.large_margin`, per example, reduced with the loss's
  Keras reduction and ``sample_weight``). The logs report ``loss``, ``margin`` and
  ``xent`` besides the compiled metrics. Compiled with any other loss it trains as a
  plain `keras.Model`.

  Functional use:

  >>> inputs = keras.Input((28, 28, 1))
  >>> h = keras.layers.Conv2D(32, 5, name="conv0", activation="relu")(inputs)
  >>> logits = keras.layers.Dense(10)(keras.layers.Flatten()(h))
  >>> model = MarginModel(inputs, logits, margin_layers=["input", "conv0"])
  >>> model.compile("sgd", loss=LargeMarginLoss(gamma=1., cross_entropy_weight=1.))

  An existing functional or `Sequential` model: ``MarginModel.from_model(model,
  margin_layers=[...])`` (the layers are shared, not copied).

  A subclassed model (no layer graph) uses the `MarginTraining` mixin instead:
  ``class Net(MarginTraining, keras.Model)`` with `margin_endpoints` overridden.

  Args:
    margin_layers: names of layers whose outputs the margin is enforced at;
      "input" is the model's (single) input. Default: ["input"].
    layers_weights: None (all 1), "size" (each layer's number of elements per
      example, as the original train.py passes for dist_norm=inf: the gradient norm
      is divided by it) or a list of positive floats, one per margin layer.
    *args, **kwargs: as `keras.Model` (e.g. ``inputs``, ``outputs``, ``name``).
  """

  @classmethod
  def from_model(cls, model, margin_layers=(INPUT,), layers_weights=None):
    """Wraps a built functional or `Sequential` model, sharing its layers."""
    try:
      inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
      inputs = outputs = None
    if not inputs or not outputs:
      raise ValueError(
          f"Model {model.name!r} has no layer graph: build it on a keras.Input (or "
          "use the MarginTraining mixin with margin_endpoints())."
      )
    if len(outputs) != 1:
      raise ValueError(
          f"The model must have one output (the logits); "
          f"{model.name!r} has {len(outputs)}."
      )
    return cls(
        inputs=inputs,
        outputs=outputs[0],
        margin_layers=margin_layers,
        layers_weights=layers_weights,
        name=model.name,
    )
