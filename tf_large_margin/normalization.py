"""Batch normalisation with the moving-variance update of the original (TF1) code."""

import math

import keras
from keras import ops


def normalization_gradient(dy, x, mean, variance, gamma, epsilon):
  """Gradients of y = gamma (x - mean) / sqrt(variance + epsilon) + beta w.r.t. x,
  gamma and beta, where mean and variance are the batch's, over all axes but the
  last (n values per channel):

      x_hat  = (x - mean) / sqrt(variance + epsilon)
      dbeta  = sum dy,   dgamma = sum dy x_hat
      dx     = gamma / sqrt(variance + epsilon) (dy - dbeta / n - x_hat dgamma / n)

  (the mean's and the variance's dependence on x included). Built from
  differentiable ops of ``x``, ``mean`` and ``variance``, so a second
  differentiation (the margin without the stop-gradient approximation) is exact.
  """
  axes = list(range(len(x.shape) - 1))
  inverse_std = ops.rsqrt(variance + epsilon)
  x_hat = (x - mean) * inverse_std
  dbeta = ops.sum(dy, axis=axes)
  dgamma = ops.sum(dy * x_hat, axis=axes)
  count = ops.cast(ops.size(x) // ops.shape(x)[-1], x.dtype)
  dx = (gamma * inverse_std) * (dy - dbeta / count - x_hat * (dgamma / count))
  return dx, dgamma, dbeta


def fused_normalization_gradient(dy, x, mean, variance, gamma, epsilon):
  """`normalization_gradient` by TensorFlow's fused kernel (`FusedBatchNormGradV3`,
  training mode; the gradient of the original's fused TF1 batch norm), for the
  CPU and XLA:CPU kernels, which read the batch variance (see
  `fused_gradient_applies`). Exact to second order: TensorFlow's gradient of the
  kernel differentiates the batch statistics itself.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # One NHWC image of all the values: the kernel reduces N, H, W alike.
  as_image = lambda t: tf.reshape(t, [1, 1, -1, tf.shape(t)[-1]])
  dx, dgamma, dbeta = tf.raw_ops.FusedBatchNormGradV3(
      y_backprop=as_image(dy),
      x=as_image(x),
      scale=gamma,
      reserve_space_1=mean,
      reserve_space_2=variance,
      reserve_space_3=variance,  # Not read by the CPU kernels.
      epsilon=epsilon,
      is_training=True,
  )[:3]
  return tf.reshape(dx, tf.shape(x)), dgamma, dbeta


def fused_gradient_applies(dtype):
  """Whether TensorFlow's fused batch-norm gradient kernel may stand in for
  `normalization_gradient`: not in float64 (the kernel has none), not with a
  visible GPU (its kernels read the inverse variance, cuDNN's saved statistics,
  where the CPU and XLA:CPU kernels read the variance given to them here).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return dtype != "float64" and not tf.config.list_physical_devices("GPU")


@keras.saving.register_keras_serializable(package="tf_large_margin")
class BatchNormalizationTF1(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` updating the moving variance as TF1 does.

  In training mode the batch is normalised with the biased batch variance, as in
  Keras; the moving statistics are updated as TF1's fused batch norm (the
  original code's `tf.layers.batch_normalization`) does it, with the
  Bessel-corrected variance of the n values reduced per channel:

      moving_mean     <- momentum * moving_mean     + (1 - momentum) * mean
      moving_variance <- momentum * moving_variance + (1 - momentum) * var * n / (n - 1)

  Keras uses ``var`` itself (a factor 1 + 2e-5 .. 1 + 8e-5 apart on the original
  MNIST CNN's layers). Inference mode, masks, renorm and synchronized batch norm
  are Keras' own (the correction applies to the plain training-mode update only).

  On the TensorFlow backend, with the channels last and both gamma and beta, the
  training-mode gradient is taken whole instead of differentiating the moments op
  by op: `fused_normalization_gradient` (on CPU, in float16/bfloat16/float32) or
  else `normalization_gradient` (float64, GPUs), both exact to second order (none
  flows through the batch statistics here). The margin's backward passes cross
  each batch norm once per competing class (`benchmarks/normalization_gradient.py`
  times the three forms). The forward values are Keras' ops, unchanged.

  Example: the original's settings (TF1's defaults are momentum 0.99, epsilon 1e-3
  in Keras but 0.9 / 1e-5 in the original MNIST network):

  >>> bn = BatchNormalizationTF1(momentum=0.9, epsilon=1e-5)
  """

  def call(self, inputs, training=None, mask=None):
    if (
        not (training and self.trainable)
        or mask is not None
        or self.renorm
        or self.synchronized  # Its statistics and their gradients span replicas.
    ):
      return super().call(inputs, training=training, mask=mask)
    compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
    inputs = keras.ops.cast(inputs, compute_dtype)
    rank = len(inputs.shape)
    axes = [i for i in range(rank) if i != self.axis % rank]
    mean, variance = keras.ops.moments(inputs, axes=axes, synchronized=self.synchronized)
    # n: an int, or a tensor when the batch size is unknown while tracing.
    count = math.prod(keras.ops.shape(inputs)[i] for i in axes)
    count = keras.ops.cast(count, compute_dtype)
    unbiased = variance * count / keras.ops.maximum(count - 1.0, 1.0)
    momentum = self.momentum
    self.moving_mean.assign(
        keras.ops.cast(self.moving_mean, compute_dtype) * momentum
        + mean * (1.0 - momentum)
    )
    self.moving_variance.assign(
        keras.ops.cast(self.moving_variance, compute_dtype) * momentum
        + unbiased * (1.0 - momentum)
    )
    offset = keras.ops.cast(self.beta, compute_dtype) if self.center else None
    scale = keras.ops.cast(self.gamma, compute_dtype) if self.scale else None
    normalize = lambda x, mean, variance, scale, offset: keras.ops.batch_normalization(
        x=x,
        mean=mean,
        variance=variance,
        axis=self.axis,
        offset=offset,
        scale=scale,
        epsilon=self.epsilon,
    )
    if (
        keras.backend.backend() == "tensorflow"
        and self.axis % rank == rank - 1
        and self.center
        and self.scale
    ):
      import tensorflow as tf  # pylint: disable=g-import-not-at-top

      epsilon = self.epsilon
      fused = fused_gradient_applies(compute_dtype)

      @tf.custom_gradient
      def normalize_with_gradient(x, mean, variance, scale, offset):
        def gradient(dy):
          gradient_of = fused_normalization_gradient if fused else normalization_gradient
          dx, dgamma, dbeta = gradient_of(dy, x, mean, variance, scale, epsilon)
          # The statistics' dependence on x is in dx: none flows through them.
          return dx, None, None, dgamma, dbeta

        return normalize(x, mean, variance, scale, offset), gradient

      outputs = normalize_with_gradient(inputs, mean, variance, scale, offset)
    else:
      outputs = normalize(inputs, mean, variance, scale, offset)
    return keras.ops.cast(outputs, self.compute_dtype)
