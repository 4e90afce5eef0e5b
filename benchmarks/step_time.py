"""Training-step time of the margin loss relative to cross-entropy, in one run.

The paper's MNIST CNN, batch 256, margin at input + conv0 + conv1, dist_norm=inf,
"size" layer weights. Prints the median step time of:
  xent           cross-entropy (a plain Keras step),
  margin k=1/9   MarginModel's step (one backward pass per class for all layers),
  original k=1/9 the original's formulation: one tf.gradients call per layer and
                 per class, norms by tf.map_fn,
and their ratios to xent. It also times the activation-only backward pass (one
forward pass and one backward pass from the logits to the margin layers), from
which "floor k" = xent + k * (that backward pass) is the least any formulation
needing one gradient per competing class can cost.

  python benchmarks/step_time.py [--batch_size=256] [--steps=10] [--jit_compile]
"""

import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import architectures
from tf_large_margin import margin_loss
from tf_large_margin import margin_scores
from tf_large_margin import margin_penalty

flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps per variant (after 2 warm-up steps).")
flags.DEFINE_boolean(
    "jit_compile", False, "Compile every variant's step with XLA (jit_compile=True)."
)
FLAGS = flags.FLAGS

MARGIN_LAYERS = ["input", "conv0", "conv1"]


def original_large_margin(
    logits,
    one_hot_labels,
    layers_list,
    layers_weights,
    *,
    gamma,
    alpha_factor,
    top_k,
    dist_norm,
    epsilon,
):
  """The original TF1 construction: tf.gradients per layer and per class."""
  probs = tf.nn.softmax(logits)
  differences, _ = margin_scores.top_k_probability_differences(probs, one_hot_labels, top_k)
  dual = margin_loss.dual_norm(dist_norm)
  losses = []
  for weight, layer in zip(layers_weights, layers_list):
    norms = tf.concat(
        [
            tf.map_fn(
                lambda g: tf.norm(g, ord=dual),
                tf.reshape(
                    tf.gradients(differences[:, i], layer)[0], [tf.shape(layer)[0], -1]
                ),
            )[:, None]
            / weight
            for i in range(top_k)
        ],
        axis=1,
    )
    distances = differences / (tf.stop_gradient(norms) + epsilon)
    losses.append(tf.reduce_mean(margin_penalty.distance_loss(distances, gamma, alpha_factor)))
  return tf.reduce_mean(losses)


class OriginalFormulation(tlm.MarginModel):
  """MarginModel whose margin term is computed as the original code does."""

  def margin_term(self, y, activations, sample_weight=None):
    del sample_weight
    logits, layers_list, _ = activations
    settings = self.margin.margin_kwargs
    term = original_large_margin(
        logits,
        tf.one_hot(tf.cast(y, tf.int32), 10),
        layers_list,
        self._layers_weights(layers_list),
        **{
            k: settings[k]
            for k in ("gamma", "alpha_factor", "top_k", "dist_norm", "epsilon")
        },
    )
    self.margin_tracker.update_state(term)
    return term


def median_step_time(model, x, y, steps):
  for _ in range(2):
    model.train_on_batch(x, y)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    model.train_on_batch(x, y)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def activation_backward_time(x, steps):
  """Median time of one backward pass from the logits to the margin layers."""
  keras.utils.set_random_seed(0)
  network = architectures.mnist_cnn()
  endpoints = keras.Model(
      network.inputs,
      [network.output] + [network.get_layer(name).output for name in MARGIN_LAYERS[1:]],
  )
  cotangent = tf.ones([x.shape[0], 10])

  @tf.function
  def forward(x):
    return endpoints(x, training=True)[0]

  @tf.function
  def forward_backward(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits, *hidden = endpoints(x, training=True)
    return tape.gradient(logits, [x] + hidden, output_gradients=cotangent)

  def median(fn):
    for _ in range(2):
      tf.nest.map_structure(lambda t: t.numpy(), fn(x))
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      tf.nest.map_structure(lambda t: t.numpy(), fn(x))
      times.append(time.perf_counter() - start)
    return float(np.median(times))

  return median(forward_backward) - median(forward)


def build(cls, margin):
  """The MNIST network as ``cls`` with ``margin`` (None: the cross-entropy step)."""
  keras.utils.set_random_seed(0)
  model = cls.from_model(
      architectures.mnist_cnn(),
      margin=margin,
      margin_layers=MARGIN_LAYERS,
      layers_weights="size",
  )
  loss = None if margin else "sparse_categorical_crossentropy"
  model.compile(
      keras.optimizers.RMSprop(1e-3), loss=loss, jit_compile=FLAGS.jit_compile
  )
  return model


def main(_):
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(FLAGS.batch_size, 28, 28, 1)).astype("float32")
  y = rng.integers(0, 10, size=FLAGS.batch_size)
  margin = lambda k: tlm.LayerMargin(
      gamma=1e4, alpha_factor=4.0, top_k=k, dist_norm=np.inf, epsilon=1e-6
  )
  variants = [
      ("xent", tlm.MarginModel, None),
      ("margin k=1", tlm.MarginModel, margin(1)),
      ("original k=1", OriginalFormulation, margin(1)),
      ("margin k=9", tlm.MarginModel, margin(9)),
      ("original k=9", OriginalFormulation, margin(9)),
  ]
  times = {}
  for name, cls, setting in variants:
    times[name] = median_step_time(build(cls, setting), x, y, FLAGS.steps)
  backward = activation_backward_time(tf.constant(x), FLAGS.steps)
  times["floor k=1"] = times["xent"] + backward
  times["floor k=9"] = times["xent"] + 9 * backward
  print(
      f"batch {FLAGS.batch_size}, {FLAGS.steps} steps, TF {tf.__version__}, "
      f"Keras {keras.__version__}, {len(tf.config.list_logical_devices('CPU'))} CPU "
      f"device(s), jit_compile={FLAGS.jit_compile}"
  )
  for name, seconds in times.items():
    print(
        f"{name:14s} {seconds * 1e3:8.1f} ms/step   {seconds / times['xent']:5.2f}x xent"
    )
  print(
      f"activation-only backward pass: {backward * 1e3:.1f} ms "
      f"({backward / times['xent']:.2f}x xent)"
  )
  for k in (1, 9):
    print(
        f"k={k}: margin step is {times[f'original k={k}'] / times[f'margin k={k}']:.2f}x "
        "faster than the original formulation"
    )


if __name__ == "__main__":
  app.run(main)
