"""Batch normalisation with the moving-variance update of the original (TF1) code."""

import math

import keras


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

  Example: the original's settings (TF1's defaults are momentum 0.99, epsilon 1e-3
  in Keras but 0.9 / 1e-5 in the original MNIST network):

  >>> bn = BatchNormalizationTF1(momentum=0.9, epsilon=1e-5)
  """

  def call(self, inputs, training=None, mask=None):
    if not (training and self.trainable) or mask is not None or self.renorm:
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
    outputs = keras.ops.batch_normalization(
        x=inputs,
        mean=mean,
        variance=variance,
        axis=self.axis,
        offset=keras.ops.cast(self.beta, compute_dtype) if self.center else None,
        scale=keras.ops.cast(self.gamma, compute_dtype) if self.scale else None,
        epsilon=self.epsilon,
    )
    return keras.ops.cast(outputs, self.compute_dtype)
