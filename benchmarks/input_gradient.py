"""The input gradient of a 5x5 convolution: TensorFlow's kernel vs the depthwise form.

`tf_large_margin.convolution.DepthwiseGradientConv2D` computes the input gradient
of a convolution as a depthwise convolution of the cotangent with the flipped
kernels (`convolution.depthwise_input_gradient`). This script times both, with and
without XLA, for batch --batch_size, 28x28 inputs of 1 and 3 channels and 32 output
channels (mnist_cnn's conv0 and an RGB stem), median of --steps calls each, and
prints the largest difference between the two results. The flags are
step_time.py's (--batch_size, --steps).

  python benchmarks/input_gradient.py [--batch_size=256] [--steps=10]
"""

from absl import app
import numpy as np
import tensorflow as tf

from tf_large_margin import convolution

import step_time

FLAGS = step_time.FLAGS


def main(_):
  print(step_time.machine())
  batch = FLAGS.batch_size
  rng = np.random.default_rng(0)
  for channels in (1, 3):
    kernel = tf.constant(rng.normal(size=(5, 5, channels, 32)), tf.float32)
    cotangent = tf.constant(rng.normal(size=(batch, 28, 28, 32)), tf.float32)

    def tensorflow_kernel(dy):
      return tf.raw_ops.Conv2DBackpropInput(
          input_sizes=[batch, 28, 28, channels],
          filter=kernel,
          out_backprop=dy,
          strides=[1, 1, 1, 1],
          padding="SAME",
      )

    depthwise = lambda dy: convolution.depthwise_input_gradient(dy, kernel, "same")
    results = {}
    for name, fn in (("Conv2DBackpropInput", tensorflow_kernel), ("depthwise", depthwise)):
      for xla in (False, True):
        compiled = tf.function(fn, jit_compile=xla)
        call = lambda: compiled(cotangent).numpy()
        results[name] = call()
        for _ in range(2):
          call()
        ms = step_time.median_seconds(call, FLAGS.steps) * 1e3
        print(f"{channels} input channel(s), {name:19s} XLA={xla!s:5s} {ms:7.1f} ms")
    difference = np.abs(results["depthwise"] - results["Conv2DBackpropInput"]).max()
    print(f"{channels} input channel(s): largest difference {difference:.2g} "
          f"(largest value {np.abs(results['depthwise']).max():.3g})")


if __name__ == "__main__":
  app.run(main)
