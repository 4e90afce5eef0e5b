"""The training-mode batch-norm gradient: op by op, written out, TensorFlow's fused kernel.

`tf_large_margin.normalization.BatchNormalizationTF1` takes the gradient of its
training-mode normalisation whole (`fused_normalization_gradient` on CPU in
float32, `normalization_gradient` in float64 or with a GPU) instead of
differentiating the batch moments op by op. This script times the three for
mnist_cnn's two batch norms (batch --batch_size, 14x14x32 and 7x7x64), median of
--steps calls each, and prints each one's largest difference from the written-out
gradient in float64. The flags are step_time.py's (--batch_size, --steps).

  python benchmarks/normalization_gradient.py [--batch_size=256] [--steps=10]
"""

from absl import app
import numpy as np
import tensorflow as tf

from tf_large_margin import normalization

import step_time

FLAGS = step_time.FLAGS
EPSILON = 1e-5


def op_by_op(dy, x, gamma):
  """Autodiff of y = gamma (x - mean) / sqrt(var + epsilon) through the moments."""
  with tf.GradientTape() as tape:
    tape.watch([x, gamma])
    mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
    y = tf.nn.batch_normalization(x, mean, variance, None, gamma, EPSILON)
  return tape.gradient(y, [x, gamma], output_gradients=dy)[0]


def whole(gradient):
  def dx(dy, x, gamma):
    mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
    return gradient(dy, x, mean, variance, gamma, EPSILON)[0]

  return dx


def main(_):
  print(step_time.machine())
  rng = np.random.default_rng(0)
  for shape in ((FLAGS.batch_size, 14, 14, 32), (FLAGS.batch_size, 7, 7, 64)):
    values = [rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape),
              rng.uniform(0.5, 1.5, size=shape[-1])]
    x, dy, gamma = (tf.constant(v, tf.float32) for v in values)
    x64, dy64, gamma64 = (tf.constant(v, tf.float64) for v in values)
    reference = whole(normalization.normalization_gradient)(dy64, x64, gamma64).numpy()
    for name, fn in (
        ("op by op (autodiff)", op_by_op),
        ("normalization_gradient", whole(normalization.normalization_gradient)),
        ("fused_normalization_gradient", whole(normalization.fused_normalization_gradient)),
    ):
      compiled = tf.function(fn)
      call = lambda: compiled(dy, x, gamma).numpy()
      difference = np.abs(call() - reference).max() / np.abs(reference).max()
      for _ in range(2):
        call()
      ms = step_time.median_seconds(call, FLAGS.steps) * 1e3
      print(f"{'x'.join(map(str, shape))}  {name:29s} {ms:6.2f} ms  "
            f"(largest difference from float64: {difference:.1e} of the largest value)")


if __name__ == "__main__":
  app.run(main)
