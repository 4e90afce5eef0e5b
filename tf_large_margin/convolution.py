"""`DepthwiseGradientConv2D`: a Keras `Conv2D` whose input gradient is a depthwise convolution.

The margin term differentiates the logits with respect to the network's input once
per competing class (`tf_large_margin.margin_loss.margin_distances`), so the input
gradient of the first convolution, which the cross-entropy step never computes, is
paid k times per step. For an input with one channel (a grayscale image) TensorFlow's
`Conv2DBackpropInput` is slow on CPU: on the original MNIST network (5x5, 1 -> 32
channels, batch 256) it takes as long as the input gradient of the 32 -> 64 channel
convolution that follows, 16 times the arithmetic.

For a stride-1 convolution y = x * w (cross-correlation, kernel [kh, kw, C_in,
C_out], padding p_before / p_after per spatial axis), the input gradient is

    dL/dx[b, p, q, i] = sum_o sum_{u,v} dL/dy[b, p - u + pb_h, q - v + pb_w, o] w[u, v, i, o]
                      = sum_o (dL/dy[..., o] (*) flip(w)[:, :, i, o])[p, q],

a depthwise cross-correlation of dL/dy with the spatially flipped kernels (channel
multiplier C_in, padding k - 1 - p_before before and k - 1 - p_after after), summed
over the C_out output channels: `tf.nn.depthwise_conv2d`, about 4x faster here. The
forward convolution and the kernel gradient are TensorFlow's own ops, so the
forward values and the kernel gradient are those of `keras.layers.Conv2D` bit for
bit; the input gradient agrees to float rounding (different summation order).

Under XLA the opposite holds (XLA's CPU depthwise convolution is ~20x slower than
its input gradient), so the layer is plain `Conv2D` in a model compiled with
``jit_compile=True``: the library's models (`MarginModel`, `JacobianModel`, ...) tell
their layers at `compile` (`use_xla_gradients`).
"""

import keras

# Measured (batch 256, 28x28, 5x5 kernel, 32 output channels, one core): 12.7 ms vs
# 51.7 ms for TensorFlow's input gradient with 1 input channel, but 100 ms vs 53 ms
# with 3 (a depthwise convolution with a channel multiplier > 1 is slow on oneDNN).
MAX_INPUT_CHANNELS = 1


def _transposed_padding(padding, kernel_size):
  """The [before, after] padding of the depthwise form, per spatial axis."""
  pads = []
  for k in kernel_size:
    if padding == "same":
      before = (k - 1) // 2  # TensorFlow's SAME: the extra row / column after.
      pads.append([k - 1 - before, before])
    else:
      pads.append([k - 1, k - 1])
  return [[0, 0], *pads, [0, 0]]


def depthwise_input_gradient(output_gradient, kernel, padding):
  """dL/dx of a stride-1, channels-last 2-D convolution from dL/dy (module docstring).

  Args:
    output_gradient: dL/dy, [batch, height', width', C_out].
    kernel: [kh, kw, C_in, C_out].
    padding: the forward convolution's padding, "same" or "valid".

  Returns:
    dL/dx, [batch, height, width, C_in].
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  kh, kw, in_channels, out_channels = kernel.shape
  flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])
  terms = tf.nn.depthwise_conv2d(
      output_gradient,
      flipped,  # [kh, kw, C_out, C_in]: channel o * C_in + i of the result
      strides=[1, 1, 1, 1],
      padding=_transposed_padding(padding, (kh, kw)),
  )
  shape = tf.shape(terms)
  terms = tf.reshape(terms, tf.concat([shape[:3], [out_channels, in_channels]], 0))
  return tf.reduce_sum(terms, axis=3)


@keras.saving.register_keras_serializable(package="tf_large_margin")
class DepthwiseGradientConv2D(keras.layers.Conv2D):
  """`keras.layers.Conv2D` with a faster input gradient for a one-channel input.

  Same arguments, weights, forward values and kernel gradient as `Conv2D`; its
  input gradient is computed as in the module docstring when the backend is
  TensorFlow, the convolution has stride 1, dilation 1, one group, channels-last
  data and `MAX_INPUT_CHANNELS` (1) input channel (otherwise it is `Conv2D`).
  Meant for the first layer of an image network trained with a margin at the
  input (`MarginModel` with ``margin_layers`` containing "input"). Inside an
  XLA-compiled function it must be told (``layer.under_xla = True``, which
  `use_xla_gradients` does for a model's layers): it then is `Conv2D`.

  >>> layer = DepthwiseGradientConv2D(8, 3, padding="same")
  >>> layer(keras.ops.ones((2, 5, 5, 1))).shape
  TensorShape([2, 5, 5, 8])
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.under_xla = False  # Set by the model's compile, not saved in the config.

  def _uses_depthwise_gradient(self, inputs):
    return (
        not self.under_xla
        and keras.backend.backend() == "tensorflow"
        and self.data_format == "channels_last"
        and self.groups == 1
        and all(s == 1 for s in self.strides)
        and all(d == 1 for d in self.dilation_rate)
        and inputs.shape[-1] is not None
        and inputs.shape[-1] <= MAX_INPUT_CHANNELS
    )

  def convolution_op(self, inputs, kernel):
    if not self._uses_depthwise_gradient(inputs):
      return super().convolution_op(inputs, kernel)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    padding = self.padding.upper()

    @tf.custom_gradient
    def convolve(x, w):
      def gradient(dy):
        dx = depthwise_input_gradient(dy, w, self.padding)
        dw = tf.raw_ops.Conv2DBackpropFilter(
            input=x,
            filter_sizes=tf.shape(w),
            out_backprop=dy,
            strides=[1, 1, 1, 1],
            padding=padding,
        )
        return dx, dw

      return tf.nn.conv2d(x, w, strides=1, padding=padding), gradient

    return convolve(tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel))


def use_xla_gradients(model, jit_compile):
  """Tells every `DepthwiseGradientConv2D` of ``model`` (nested models included) whether
  its steps are compiled with XLA (``jit_compile``), where it must be `Conv2D`."""
  for layer in model.layers:
    if isinstance(layer, DepthwiseGradientConv2D):
      layer.under_xla = bool(jit_compile)
    elif isinstance(layer, keras.Model):
      use_xla_gradients(layer, jit_compile)
