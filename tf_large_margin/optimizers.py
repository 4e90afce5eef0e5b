"""Optimizers with the semantics of the original (TF1) training code."""

import keras


@keras.saving.register_keras_serializable(package="tf_large_margin")
class RMSpropTF1(keras.optimizers.RMSprop):
  """RMSProp as TF1's `tf.train.RMSPropOptimizer` (the original code's optimizer).

  Per variable, with gradient g (non-centered):

      ms  <- rho * ms + (1 - rho) * g^2          ms starts at 1 (Keras: at 0)
      mom <- momentum * mom + lr * g / sqrt(ms + epsilon)
      var <- var - mom

  Keras' `RMSprop` already puts epsilon inside the square root; the difference is
  the accumulator's start value. Starting at 1 makes the first steps about
  lr * g (small for small gradients) instead of lr * g / sqrt((1 - rho) g^2 +
  epsilon), about 3 lr * sign(g): with the original's learning rate 0.1 the Keras
  semantics take steps of ~0.3 per weight at once. Centered: the mean-gradient
  accumulator starts at 0, as in TF1. Defaults are TF1's (rho 0.9, epsilon 1e-10).

  Args: as `keras.optimizers.RMSprop`.
  """

  def __init__(
      self,
      learning_rate=0.001,
      rho=0.9,
      momentum=0.0,
      epsilon=1e-10,
      centered=False,
      **kwargs
  ):
    super().__init__(
        learning_rate=learning_rate,
        rho=rho,
        momentum=momentum,
        epsilon=epsilon,
        centered=centered,
        **kwargs
    )

  def add_variable_from_reference(
      self, reference_variable, name=None, initializer="zeros"
  ):
    """Keras' slot creation, with the rms accumulators ("velocity") starting at 1.

    `RMSprop.build` creates its slots through this public method, so the
    accumulators are created with a ones initializer (TF1) rather than assigned
    after creation: `fit` builds the optimizer symbolically, where an assignment
    made during the build does not persist.
    """
    if name == "velocity":
      initializer = "ones"
    return super().add_variable_from_reference(
        reference_variable, name=name, initializer=initializer
    )
