"""A functional model's forward pass with its margin layers perturbed, and the
gradients at those layers from one `jax.vjp` (Eq. 10 under the JAX backend).

Eq. 10 needs, at each margin layer h_l, grad_{h_l} (p_y - p_j) = c_j^T dz/dh_l, with
the analytic cotangent c_j = d(p_y - p_j)/dz of the logits z. JAX has no tape that
watches intermediate tensors, so the model is cut at the margin layers into segments
(Keras sub-models sharing its layers), in topological order, and run with a
perturbation delta_l added to each margin activation:

    h_1 = S_1(x),   h_l = S_l(x, h_1 + delta_1, ..., h_{l-1} + delta_{l-1}),
    z = S_out(x, h_1 + delta_1, ..., h_L + delta_L).

At delta = 0 this is the model, and dz/d delta_l is the total derivative dz/dh_l
(through the later segments too). `jax.vjp` of z w.r.t. (x, delta_1, ..., delta_L)
therefore gives the gradients at every margin layer (and at the input) in one
backward pass per cotangent, that is per competing class j.

A layer on a path that bypasses a cut (a skip connection from before h_l to after
it) runs in every segment that takes its output: the values are the model's, but a
batch normalization on such a path, in training mode, updates its moving statistics
once per segment.
"""

import keras
from keras import ops

INPUT = "input"


class PerturbedForward:
  """The segments of a functional ``model`` cut at the layers ``names``.

  Args:
    model: a functional model with one input and one output.
    names: the margin layers: layer names, or "input" for the model's input.
  """

  def __init__(self, model, names):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
      raise ValueError(
          "The margin under JAX needs a functional model with one input and one "
          f"output; {model.name!r} has {len(model.inputs)} and "
          f"{len(model.outputs)}."
      )
    position = {layer.name: i for i, layer in enumerate(model.layers)}
    self.model = model
    self.names = list(names)
    self.cut_names = sorted((n for n in names if n != INPUT), key=position.get)
    cuts = [model.get_layer(name).output for name in self.cut_names]
    self.cuts = cuts
    # A margin at the output layer: the output is the last cut, no segment follows.
    output = model.outputs[0]
    self.output_cut = next((l for l, cut in enumerate(cuts) if cut is output), None)
    last = [] if self.output_cut is not None else [
        keras.Model(model.inputs + cuts, output, name=f"{model.name}_out")
    ]
    self.segments = [
        keras.Model(model.inputs + cuts[:l], cut, name=f"{model.name}_segment{l}")
        for l, cut in enumerate(cuts)
    ] + last

  def __call__(self, x, deltas, training=False):
    """``(output, activations)``: the model's output on ``x`` with ``deltas`` (one
    per cut, in ``cut_names`` order) added to the margin layers' activations, and
    those perturbed activations."""
    hidden = []
    for segment, delta in zip(self.segments, deltas):
      hidden.append(segment([x] + hidden, training=training) + delta)
    if self.output_cut is not None:
      return hidden[self.output_cut], hidden
    return self.segments[-1]([x] + hidden, training=training), hidden

  def zero_deltas(self, x):
    """Zero perturbations, one per cut, for the batch ``x``."""
    return [
        ops.zeros((ops.shape(x)[0],) + tuple(cut.shape[1:]), cut.dtype)
        for cut in self.cuts
    ]

  def jax_vjp(self, x, training, to_logits):
    """One forward pass and its pullback, under JAX (inside or outside Keras'
    stateless training step).

    Runs the perturbed forward pass in a `keras.StatelessScope` on the variables'
    current values, inside `jax.vjp`; the new values of the non-trainable variables
    (batch-norm moving statistics, seeds) are assigned afterwards.

    Args:
      x: the input batch.
      training: the layers' training mode.
      to_logits: maps the model's output to the logits the margin measures.

    Returns:
      ``(output, logits, layers, vjp)``: ``layers`` are the activations of
      ``names`` in that order (``x`` for "input"); ``vjp(cotangent)`` returns the
      gradients of <logits, cotangent> at ``layers``, in the same order.
    """
    import jax  # pylint: disable=import-outside-toplevel

    model = self.model
    variables = model.trainable_variables + model.non_trainable_variables
    values = [v.value for v in variables]
    with_input = INPUT in self.names

    def logits_of(*primals):
      inputs, deltas = primals if with_input else (x, primals[0])
      with keras.StatelessScope(
          state_mapping=list(zip(variables, values)), collect_losses=True
      ) as scope:
        output, hidden = self(inputs, deltas, training=training)
        logits = to_logits(output)
      updates = [scope.get_current_value(v) for v in model.non_trainable_variables]
      return logits, (output, hidden, updates, scope.losses)

    x = ops.convert_to_tensor(x)
    primals = (x, self.zero_deltas(x)) if with_input else (self.zero_deltas(x),)
    logits, pullback, (output, hidden, updates, losses) = jax.vjp(
        logits_of, *primals, has_aux=True
    )
    if losses:
      raise ValueError(
          f"Model {model.name!r} adds losses in its forward pass (activity "
          "regularization): not supported by the margin under JAX yet."
      )
    for variable, value in zip(model.non_trainable_variables, updates):
      variable.assign(value)
    by_name = dict(zip(self.cut_names, hidden))
    layers = [x if name == INPUT else by_name[name] for name in self.names]

    def vjp(cotangent):
      gradients = pullback(ops.cast(cotangent, logits.dtype))
      x_gradient, delta_gradients = gradients if with_input else (None, gradients[0])
      by_name = dict(zip(self.cut_names, delta_gradients))
      return [x_gradient if name == INPUT else by_name[name] for name in self.names]

    return output, logits, layers, vjp
