"""Where the margin's activation-only backward pass spends its time, layer by layer.

The margin step makes one backward pass per competing class from the logits to the
margin layers (`benchmarks/step_time.py`). This script times, on the paper's MNIST
CNN (`mnist_cnn`, batch 256, training mode), a forward pass followed by the
gradient of the logits (one cotangent) with respect to the output of each layer in
turn, from the last layer to the input: each row's increment over the row above is
the cost of differentiating through that layer (median of --steps calls each; on a
loaded machine the increments are noisy, a few ms). The flags are step_time.py's
(--batch_size, --steps; the others are not used here).

  python benchmarks/backward_pass_breakdown.py [--batch_size=256] [--steps=10]
"""

from absl import app
import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import architectures

import step_time

FLAGS = step_time.FLAGS

LAYERS = [
    "fc0", "flatten", "conv1", "conv1_relu", "conv1_pool", "conv1_conv",
    "conv0", "conv0_relu", "conv0_pool", "conv0_conv",
]


def main(_):
  keras.utils.set_random_seed(0)
  network = architectures.mnist_cnn()
  endpoints = keras.Model(
      network.inputs,
      [network.output] + [network.get_layer(name).output for name in LAYERS],
  )
  batch = FLAGS.batch_size
  x = tf.constant(np.random.default_rng(0).uniform(size=(batch, 28, 28, 1)), tf.float32)
  cotangent = tf.ones([batch, 10])

  def gradient_to(index):
    @tf.function
    def call(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        logits, *hidden = endpoints(x, training=True)
      sources = hidden + [x]
      return tape.gradient(logits, sources[index], output_gradients=cotangent)

    return call

  def timed(fn):
    call = lambda: fn(x).numpy()
    for _ in range(2):
      call()
    return step_time.median_seconds(call, FLAGS.steps) * 1e3

  print(step_time.machine())
  previous = timed(tf.function(lambda x: endpoints(x, training=True)[0]))
  print(f"{'forward pass':28s} {previous:7.1f} ms")
  for index, name in enumerate(LAYERS + ["input"]):
    total = timed(gradient_to(index))
    print(f"{'gradient at ' + name:28s} {total:7.1f} ms  (+{total - previous:5.1f})")
    previous = total


if __name__ == "__main__":
  app.run(main)
