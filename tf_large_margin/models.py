"""`MarginModel`: a Keras model that enforces the large margin at its layers (Eq. 10).

The margin at the input and at hidden layers is a setting of the model: which
activations its forward pass captures (``margin_layers``) and Eq. 10's
hyper-parameters (``margin=LayerMargin(...)``). The model's `compute_loss` adds the
margin term to Keras' compiled loss and ``model.losses``; its `train_step` records
the forward pass on a persistent inner tape (the logits as a function of the
activations, which the margin differentiates) inside the outer tape of the weights;
under JAX the gradients at the layers come from `jax.vjp` (`perturbed_forward`).
"""

import math
from typing import NamedTuple

import keras
from keras import ops

from tf_large_margin import compat
from tf_large_margin import convolution
from tf_large_margin import margin_loss
from tf_large_margin import perturbed_forward
from tf_large_margin.jax_step import JaxTotalLossStep
from tf_large_margin.labels import to_one_hot
from tf_large_margin.losses import LargeMarginLoss
from tf_large_margin.losses import LayerMargin
from tf_large_margin.losses import probabilities_to_logits
from tf_large_margin.perturbed_forward import INPUT

SIZE = "size"


def replicas():
  """The number of replicas a global batch is split over (1 outside tf.distribute).

  Under JAX it is 1: a data-parallel step (`keras.distribution.DataParallel`)
  computes the loss of the global batch on sharded arrays."""
  if keras.backend.backend() != "tensorflow":
    return 1
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return tf.distribute.get_strategy().num_replicas_in_sync


def scale_for_replicas(loss):
  """``loss / replicas``, as Keras' losses are scaled: the gradients of the
  replicas are summed."""
  count = replicas()
  return loss * ops.cast(1.0 / count, loss.dtype) if count > 1 else loss


def unscale_for_replicas(loss):
  """``loss * replicas``: a replica's loss on its own batch (what the trackers
  average)."""
  count = replicas()
  return loss * ops.cast(count, loss.dtype) if count > 1 else loss


def graph_config(model):
  """The config of ``model``'s layer graph (a functional model on its inputs and
  outputs), or None when a layer cannot give its config."""
  try:
    graph = keras.Model(model.inputs, model.outputs, name=f"{model.name}_graph")
    return graph.get_config()
  except (NotImplementedError, TypeError, ValueError):
    return None


def layer_outputs_model(model, names):
  """A functional model sharing ``model``'s layers that returns its single output
  (the logits) followed by the outputs of the layers ``names``.

  Raises ValueError for several model outputs, an unknown name, a layer called
  several times in the model (ambiguous output; checked when the model's layers
  give their configs) or a layer with several outputs.
  """
  if len(model.outputs) != 1:
    raise ValueError(
        f"The model needs one output (the logits); got {len(model.outputs)}."
    )
  config = graph_config(model) if names else None
  calls = {} if config is None else {
      layer["name"]: len(layer["inbound_nodes"]) for layer in config["layers"]
  }
  outputs = []
  for name in names:
    try:
      layer = model.get_layer(name)
    except ValueError:
      known = ", ".join(repr(l.name) for l in model.layers)
      raise ValueError(
          f"Unknown layer {name!r}: the model's layers are {known} (or 'input')."
      ) from None
    if calls.get(name, 1) != 1:
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


def output_layer(model):
  """The layer computing a functional ``model``'s single output (None if the
  model's layers cannot give their configs)."""
  config = graph_config(model)
  if config is None:
    return None
  ((name, _, _),) = config["output_layers"]
  return model.get_layer(name)


def applies_softmax(layer):
  """Whether ``layer``'s output is a softmax (a `Softmax` layer, or a softmax
  activation as in ``Dense(..., activation="softmax")``)."""
  return isinstance(layer, keras.layers.Softmax) or (
      getattr(layer, "activation", None) is keras.activations.softmax
  )


class TotalLossStep(JaxTotalLossStep, compat.MultiWorkerFit):
  """Mixin: Keras' ``train_step`` / ``test_step`` for a loss term that needs what the
  forward pass computed on the way (activations, the tape that recorded them).

  Subclasses implement ``forward_pass(x, training)``, returning ``(y_pred,
  activations)`` from one forward pass, and override the public ``compute_loss``
  with a keyword ``activations`` (None: make its own forward pass) to add their
  term to Keras' loss (`keras_loss`). The steps are those of Keras' TensorFlow
  trainer, from public pieces: `keras.utils.unpack_x_y_sample_weight`, an outer
  tape around `total_loss`, ``optimizer.scale_loss`` / ``apply``,
  ``compute_metrics``; the ``loss`` tracker is the model's own. Under JAX, Keras'
  trainer runs `total_loss` through `jax_step.JaxTotalLossStep`. While
  ``adds_loss_term()`` is False the plain Keras steps run.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.loss_tracker = keras.metrics.Mean(name="loss")

  def compile(self, *args, **kwargs):
    """`keras.Model.compile`; tells the `DepthwiseGradientConv2D` layers whether the steps
    are compiled with XLA (``jit_compile``, resolved by Keras)."""
    super().compile(*args, **kwargs)
    convolution.use_xla_gradients(self, self.jit_compile)

  def compile_from_config(self, config):
    """Keras' `compile_from_config` (the saved compile arguments, on loading),
    through this class's `compile`; builds the optimizer of a built model."""
    self.compile(**keras.saving.deserialize_keras_object(config))
    if self.built:
      self.optimizer.build(self.trainable_variables)

  def adds_loss_term(self):
    return True

  def term_trackers(self):
    """The trackers of the added terms, logged after Keras' metrics."""
    return []

  def forward_pass(self, x, training=False):
    raise NotImplementedError

  def keras_loss(self, x, y, y_pred, sample_weight=None, training=True):
    """Keras' `compute_loss`: the compiled loss plus ``model.losses`` (0 when there
    is neither, e.g. ``compile(loss=None)`` with the margin term alone)."""
    if self.loss is None and not self.losses:
      return ops.zeros((), keras.config.floatx())
    return super().compute_loss(x, y, y_pred, sample_weight, training=training)

  def total_loss(self, x, y, sample_weight=None, training=False):
    """One forward pass and the step's loss: ``(loss, y_pred)``.

    Also updates the loss trackers (``loss`` and the terms').
    """
    y_pred, activations = self.forward_pass(x, training=training)
    loss = self.compute_loss(
        x, y, y_pred, sample_weight, training=training, activations=activations
    )
    batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
    self.loss_tracker.update_state(unscale_for_replicas(loss), sample_weight=batch_size)
    return loss, y_pred

  @property
  def metrics(self):
    """Keras' metrics. With the added term, the model's ``loss`` tracker replaces
    Keras' (which these steps do not update) and the terms' trackers follow;
    without it, the model's trackers are left out."""
    own = [self.loss_tracker] + self.term_trackers()
    metrics = [m for m in super().metrics if not any(m is t for t in own)]
    if not self.adds_loss_term():
      return metrics
    return [self.loss_tracker] + [m for m in metrics if m.name != "loss"] + own[1:]

  def train_step(self, *args):
    """TensorFlow: the step on ``data``; JAX: Keras' step on ``(state, data)``,
    which differentiates `JaxTotalLossStep.compute_loss_and_updates`."""
    if keras.backend.backend() == "jax":
      return super().train_step(*args)
    (data,) = args
    if not self.adds_loss_term():
      return compat.logs_for_reduction(super().train_step(data))
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      loss, y_pred = self.total_loss(x, y, sample_weight, training=True)
      scaled_loss = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled_loss, self.trainable_weights)
    self.optimizer.apply(gradients, self.trainable_weights)
    return compat.logs_for_reduction(
        self.compute_metrics(x, y, y_pred, sample_weight)
    )

  def test_step(self, *args):
    if keras.backend.backend() == "jax":
      return super().test_step(*args)
    (data,) = args
    if not self.adds_loss_term():
      return compat.logs_for_reduction(super().test_step(data))
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    _, y_pred = self.total_loss(x, y, sample_weight, training=False)
    return compat.logs_for_reduction(
        self.compute_metrics(x, y, y_pred, sample_weight)
    )


class MarginActivations(NamedTuple):
  """What the margin term needs from the forward pass.

  Attributes:
    logits: the logits (log p for a probabilities output, ``from_logits=False``).
    layers: the activations of ``margin_layers``, in that order (the input for
      "input").
    tape: TensorFlow: the persistent `tf.GradientTape` that recorded ``logits``
      from ``layers``.
    vjp: JAX: the function from a cotangent of ``logits`` to the gradients at
      ``layers`` (`perturbed_forward.PerturbedForward.jax_vjp`).
  """

  logits: object
  layers: list
  tape: object = None
  vjp: object = None


class MarginTraining(TotalLossStep):
  """Mixin with the margin term and the training step; see `MarginModel`.

  For a subclassed model (no layer graph): ``class Net(MarginTraining,
  keras.Model)`` overriding `margin_endpoints(x, training)` to return ``(logits,
  activations)``, the activations of the names in ``margin_layers`` other than
  "input", in that order, computed in the same forward pass as the logits.
  (Subclass this mixin, not `MarginModel`: Keras rewrites the base classes of a
  `keras.Model` subclass used functionally, as `MarginModel` is.)
  """

  def __init__(
      self,
      *args,
      margin=None,
      margin_layers=(INPUT,),
      layers_weights=None,
      **kwargs,
  ):
    super().__init__(*args, **kwargs)
    margin_layers = (
        [margin_layers] if isinstance(margin_layers, str) else list(margin_layers)
    )
    if not margin_layers:
      raise ValueError("margin_layers is empty: name at least one layer or 'input'.")
    if layers_weights is not None and layers_weights != SIZE:
      layers_weights = [float(w) for w in layers_weights]
      margin_loss.check_layers_weights(layers_weights, len(margin_layers))
    if isinstance(margin, dict):
      margin = keras.saving.deserialize_keras_object(margin)
    if margin is not None and not isinstance(margin, LayerMargin):
      raise TypeError(
          "margin must be a tf_large_margin.LayerMargin (or None: no margin term); "
          f"got {type(margin).__name__}. LargeMarginLoss is the logit-space loss "
          "for compile()."
      )
    self.margin = margin
    self.margin_layers = margin_layers
    self.layers_weights = layers_weights
    self.margin_tracker = keras.metrics.Mean(name="margin")
    if getattr(self, "inputs", None):  # A layer graph (functional): resolve now.
      self._build_endpoints()

  def _build_endpoints(self):
    """The logits and margin layers' outputs in one call (untracked by Keras)."""
    if INPUT in self.margin_layers and len(self.inputs) != 1:
      raise ValueError(
          f"'input' is ambiguous for a model with {len(self.inputs)} inputs."
      )
    names = [name for name in self.margin_layers if name != INPUT]
    object.__setattr__(self, "_endpoints", layer_outputs_model(self, names))
    if keras.backend.backend() == "jax" and self.margin is not None:
      perturbed = perturbed_forward.PerturbedForward(self, self.margin_layers)
      object.__setattr__(self, "_perturbed", perturbed)
    if self.margin is not None and self.margin.from_logits:
      layer = output_layer(self)
      if layer is not None and applies_softmax(layer):
        raise ValueError(
            f"The output layer {layer.name!r} applies a softmax: the model outputs "
            "probabilities, but the margin has from_logits=True. Pass "
            "LayerMargin(..., from_logits=False) (log p is then used as the "
            "logits) or make the model output logits."
        )

  def margin_endpoints(self, x, training=False):
    """One forward pass: ``(output, [outputs of the margin layers but "input"])``.

    Functional models get it from their layer graph; subclassed models override it.
    """
    output, *hidden = keras.tree.flatten(self._endpoints(x, training=training))
    return output, hidden

  def _layers_weights(self, layers_list):
    if self.layers_weights == SIZE:
      return [float(math.prod(h.shape[1:])) for h in layers_list]
    return self.layers_weights

  def adds_loss_term(self):
    return self.margin is not None

  def term_trackers(self):
    return [self.margin_tracker]

  def compile(self, optimizer="rmsprop", loss=None, *args, **kwargs):
    """`keras.Model.compile`; a `LargeMarginLoss` without ``margin`` is an error.

    Without ``margin`` the model has no margin term, and a compiled
    `LargeMarginLoss` would measure the margin at the logits only, whatever
    ``margin_layers`` say.
    """
    if self.margin is None and any(
        isinstance(l, LargeMarginLoss) for l in keras.tree.flatten(loss)
    ):
      raise ValueError(
          f"{type(self).__name__} has no margin setting (margin=None) but is "
          "compiled with a LargeMarginLoss, which measures the margin at the "
          f"logits only, not at margin_layers {self.margin_layers}. For the margin "
          "at those layers pass margin=tf_large_margin.LayerMargin(...) to the "
          "model (and compile with a cross-entropy, or loss=None); for the logit "
          "margin alone compile a plain keras.Model."
      )
    super().compile(optimizer, loss, *args, **kwargs)

  def forward_pass(self, x, training=False):
    """One forward pass recorded for the margin: ``(y_pred, MarginActivations)``.

    The persistent inner tape watches the input and records the logits (log p of
    a probabilities output, ``margin.from_logits=False``) from the activations of
    ``margin_layers``. Under JAX the activations come from a perturbed forward
    pass and their gradients from `jax.vjp`
    (`perturbed_forward.PerturbedForward.jax_vjp`).
    """
    from_logits = self.margin is None or self.margin.from_logits
    if keras.backend.backend() == "jax":
      perturbed = getattr(self, "_perturbed", None)
      if perturbed is None:
        raise ValueError(
            f"{type(self).__name__} has no layer graph: the margin under JAX needs "
            "a functional model (MarginModel)."
        )
      to_logits = (lambda z: z) if from_logits else probabilities_to_logits
      y_pred, logits, layers, vjp = perturbed.jax_vjp(x, training, to_logits)
      return y_pred, MarginActivations(logits, layers, vjp=vjp)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    x = tf.convert_to_tensor(x)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      y_pred, hidden = self.margin_endpoints(x, training=training)
      logits = y_pred if from_logits else probabilities_to_logits(y_pred)
    hidden = iter(hidden)
    layers = [x if name == INPUT else next(hidden) for name in self.margin_layers]
    return y_pred, MarginActivations(logits, layers, tape)

  def margin_term(self, y, activations, sample_weight=None):
    """The margin term of the loss: ``margin`` at the margin layers, per example,
    reduced as a compiled Keras loss (sample weights, reduction, tf.distribute
    scaling). Updates the ``margin`` tracker."""
    logits, layers = activations.logits, activations.layers
    one_hot = to_one_hot(y, logits.shape[-1])
    try:
      values = self.margin.per_example(
          one_hot,
          logits,
          layers,
          self._layers_weights(layers),
          tape=activations.tape,
          vjp=activations.vjp,
      )
    except ValueError as error:
      raise ValueError(
          f"{error} layers_list is the margin_layers {self.margin_layers}."
      ) from error
    term = self.margin.reduce(values, sample_weight)
    self.margin_tracker.update_state(
        unscale_for_replicas(term), sample_weight=ops.shape(logits)[0]
    )
    return term

  def layer_distances(self, x, y):
    """Eq. 10's distances at each margin layer, as the margin term sees them.

    One inference-mode forward pass (``training=False``) on ``x``; the distances use
    the settings of ``margin`` (top_k, dist_norm, epsilon, score) and the layer
    weights of the model.

    Returns:
      A list with one [batch, top_k] tensor per name of ``margin_layers``.
    """
    if self.margin is None:
      raise ValueError(f"{type(self).__name__} has no margin setting (margin=None).")
    _, (logits, layers, tape, vjp) = self.forward_pass(x, training=False)
    _, distances = margin_loss.margin_distances(
        logits=logits,
        one_hot_labels=to_one_hot(y, logits.shape[-1]),
        layers_list=layers,
        top_k=self.margin.top_k,
        dist_norm=self.margin.dist_norm,
        epsilon=self.margin.epsilon,
        layers_weights=self._layers_weights(layers),
        tape=tape,
        vjp=vjp,
        score=self.margin.score,
    )
    return distances

  def compute_loss(
      self,
      x=None,
      y=None,
      y_pred=None,
      sample_weight=None,
      training=True,
      activations=None,
  ):
    """Keras' loss (compiled loss and ``model.losses``) plus the margin term.

    Args:
      x, y, y_pred, sample_weight, training: as `keras.Model.compute_loss`.
      activations: the `MarginActivations` of the forward pass that gave
        ``y_pred`` (the training step passes them); None: the margin term makes
        its own forward pass on ``x`` (as when Keras calls this method itself).
    """
    loss = self.keras_loss(x, y, y_pred, sample_weight, training=training)
    if self.margin is None:
      return loss
    if activations is None:
      _, activations = self.forward_pass(x, training=training)
    term = self.margin_term(y, activations, sample_weight)
    return term + ops.cast(loss, term.dtype)

  def get_config(self):
    config = super().get_config()
    config.update(
        margin=(
            None
            if self.margin is None
            else keras.saving.serialize_keras_object(self.margin)
        ),
        margin_layers=list(self.margin_layers),
        layers_weights=self.layers_weights,
    )
    return config


@keras.saving.register_keras_serializable(package="tf_large_margin")
class MarginModel(MarginTraining, keras.Model):
  """A Keras model that enforces the large margin at chosen layers (Eq. 10).

  With ``margin=LayerMargin(...)``, one forward pass returns the output and the
  activations h_l of ``margin_layers``, and the training step minimises

      compiled loss + sum(model.losses) + mean_l margin(h_l)

  (margin per example as `tf_large_margin.large_margin_per_example` with the
  settings of ``margin``, reduced over the batch as a compiled Keras loss). The
  compiled loss may be None (the margin alone, as the original MNIST recipe) or
  any Keras loss, e.g. the cross-entropy with ``loss_weights``. The logs report
  ``loss`` and ``margin`` besides the compiled metrics. With ``margin=None`` the
  model trains as a plain `keras.Model`.

  Functional use:

  >>> inputs = keras.Input((28, 28, 1))
  >>> h = keras.layers.Conv2D(32, 5, name="conv0", activation="relu")(inputs)
  >>> logits = keras.layers.Dense(10)(keras.layers.Flatten()(h))
  >>> model = MarginModel(inputs, logits, margin=LayerMargin(gamma=1.),
  ...                     margin_layers=["input", "conv0"])
  >>> model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(
  ...     from_logits=True))

  An existing functional or `Sequential` model: ``MarginModel.from_model(model,
  margin_layers=[...], margin=...)`` (the layers are shared, not copied).

  A subclassed model (no layer graph) uses the `MarginTraining` mixin instead:
  ``class Net(MarginTraining, keras.Model)`` with `margin_endpoints` overridden.

  Args:
    margin: a `tf_large_margin.LayerMargin` (Eq. 10's hyper-parameters, and
      ``from_logits``: a softmax output needs False), or None for no margin term.
      Compiling a `LargeMarginLoss` (the logit-space loss) without it is an error.
    margin_layers: names of layers whose outputs the margin is enforced at;
      "input" is the model's (single) input. Default: ["input"].
    layers_weights: None (all 1), "size" (each layer's number of elements per
      example, as the original train.py passes for dist_norm=inf: the gradient norm
      is divided by it) or a list of positive floats, one per margin layer.
    *args, **kwargs: as `keras.Model` (e.g. ``inputs``, ``outputs``, ``name``).
  """

  @classmethod
  def from_model(cls, model, margin_layers=(INPUT,), layers_weights=None, margin=None):
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
        margin=margin,
        margin_layers=margin_layers,
        layers_weights=layers_weights,
        name=model.name,
    )
