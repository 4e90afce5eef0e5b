"""The training and test steps of `models.TotalLossStep` under Keras' JAX trainer.

Keras' JAX trainer differentiates the stateless function
``compute_loss_and_updates(trainable, non_trainable, metrics, x, y, sample_weight)``
with `jax.value_and_grad` (and `jax.jit` with ``jit_compile``, sharded by
`keras.distribution`). `JaxTotalLossStep` overrides it: in one `keras.StatelessScope`
on the given variable values it runs the model's `total_loss` (one forward pass,
Keras' loss plus the added term, the trackers), and returns the loss with the new
non-trainable and metric values. For `MarginModel` the forward pass is
`perturbed_forward.PerturbedForward.jax_vjp`, so the margin's gradients at the
layers are `jax.vjp` pullbacks inside the differentiated function (the
stop-gradient approximation is `jax.lax.stop_gradient`, via `keras.ops`).
"""

import keras


def current_values(scope, variables, values):
  """The values of ``variables`` at the end of ``scope`` (``values`` if unset)."""
  found = [scope.get_current_value(v) for v in variables]
  return [value if new is None else new for new, value in zip(found, values)]


class JaxTotalLossStep:
  """Mixin for `models.TotalLossStep`: Keras' JAX trainer step through its
  ``total_loss``; the plain Keras step while ``adds_loss_term()`` is False."""

  def compute_loss_and_updates(
      self,
      trainable_variables,
      non_trainable_variables,
      metrics_variables,
      x,
      y,
      sample_weight,
      training=False,
      optimizer_variables=None,
  ):
    """Keras' stateless loss, with the model's term: ``(scaled loss, (loss,
    y_pred, non-trainable values, metric values))``, as Keras' JAX trainer."""
    if not self.adds_loss_term():
      return super().compute_loss_and_updates(
          trainable_variables,
          non_trainable_variables,
          metrics_variables,
          x,
          y,
          sample_weight,
          training=training,
          optimizer_variables=optimizer_variables,
      )
    variables = [
        (self.trainable_variables, trainable_variables),
        (self.non_trainable_variables, non_trainable_variables),
        (self.metrics_variables, metrics_variables),
    ]
    mapping = [pair for refs, values in variables for pair in zip(refs, values)]
    with keras.StatelessScope(state_mapping=mapping) as scope:
      loss, y_pred = self.total_loss(x, y, sample_weight, training=training)
    non_trainable_variables, metrics_variables = (
        current_values(scope, refs, values) for refs, values in variables[1:]
    )
    unscaled_loss = loss
    if training and self.optimizer is not None:
      optimizer_mapping = list(zip(self.optimizer.variables, optimizer_variables))
      with keras.StatelessScope(state_mapping=optimizer_mapping):
        loss = self.optimizer.scale_loss(loss)
    return loss, (unscaled_loss, y_pred, non_trainable_variables, metrics_variables)
