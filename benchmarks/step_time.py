"""Training-step time of the margin loss relative to cross-entropy, in one run.

The paper's MNIST CNN, batch 256, margin at input + conv0 + conv1, dist_norm=inf,
"size" layer weights. Prints the median step time of:
  xent           cross-entropy (a plain Keras step),
  margin k=1/9   MarginModel's step (one backward pass per class for all layers),
  original k=1/9 the original's formulation: one tf.gradients call per layer and
                 per class, norms by tf.map_fn,
and their ratios to xent. It also times the activation-only backward pass (one
forward pass and one backward pass from the logits to the margin layers), from
which "floor k" = xent + k * (that backward pass) is what a formulation making one
such backward pass per competing class costs when the passes run one after the
other; in the margin step the k passes are independent, and TensorFlow runs them
side by side on the cores, so the step can come in below it.

Ratios depend on the machine (CPU, cores, load, TF's kernels): the first line of
the output names it. With ``--repeats=N`` the variants are timed in N interleaved
rounds (each round times every variant once, in turn), each ratio is taken within
its round, and its min / median / max over the rounds is printed.

With ``--backend=jax`` the same script then times, in a subprocess under
KERAS_BACKEND=jax, the cross-entropy and margin steps of the same network under
JAX (`MarginModel`'s `jax.vjp` step, always compiled with XLA) and prints them
beside TensorFlow's: absolute ms/step and ratios to each backend's cross-entropy
(the TensorFlow rounds first, then the JAX rounds).

  python benchmarks/step_time.py [--batch_size=256] [--steps=10] [--repeats=1]
      [--jit_compile] [--backend=tensorflow|jax]
"""

import json
import os
import platform
import subprocess
import sys
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
flags.DEFINE_integer(
    "steps", 10, "Timed steps per variant and round (after 2 warm-up steps)."
)
flags.DEFINE_integer(
    "repeats", 1, "Interleaved rounds: each times every variant once, in turn."
)
flags.DEFINE_boolean(
    "jit_compile", False, "Compile every variant's step with XLA (jit_compile=True)."
)
flags.DEFINE_enum(
    "backend",
    "tensorflow",
    ["tensorflow", "jax"],
    "jax: also time the steps under the JAX backend (in a subprocess) and print "
    "them beside TensorFlow's.",
)
flags.DEFINE_boolean(
    "rounds_json", False, "Print only the rounds' times as JSON (the JAX subprocess)."
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
    logits, layers_list = activations.logits, activations.layers
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


def median_seconds(fn, steps):
  """Median wall time of ``steps`` calls of ``fn`` (warm: the caller warmed it up)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def training_step(model, x, y):
  """One `train_on_batch` of ``model``, after 2 warm-up steps."""
  step = lambda: model.train_on_batch(x, y)
  for _ in range(2):
    step()
  return step


def activation_backward(x):
  """``(forward, forward_backward)``: calls running one training-mode forward pass of
  the network, and that pass followed by one backward pass from the logits to the
  margin layers (the activation-only backward pass), after 2 warm-up calls each."""
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

  calls = []
  for fn in (forward, forward_backward):
    call = lambda fn=fn: tf.nest.map_structure(lambda t: t.numpy(), fn(x))
    for _ in range(2):
      call()
    calls.append(call)
  return tuple(calls)


def machine():
  """CPU model, core count, load, TensorFlow / Keras versions and oneDNN setting."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      names = [
          line.split(":", 1)[1].strip()
          for line in cpuinfo
          if line.startswith("model name")
      ]
    model = names[0] if names else model
  except OSError:
    pass
  onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
  onednn = (
      f"TF_ENABLE_ONEDNN_OPTS={onednn}"
      if onednn is not None
      else "TF_ENABLE_ONEDNN_OPTS unset (TF's default: on for x86-64 builds)"
  )
  load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
  return (
      f"CPU {model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
      f"load average {load}; TF {tf.__version__}, Keras {keras.__version__}, {onednn}"
  )


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
  jit_compile = FLAGS.jit_compile or keras.backend.backend() == "jax"
  model.compile(keras.optimizers.RMSprop(1e-3), loss=loss, jit_compile=jit_compile)
  return model


def spread(values):
  return f"{min(values):5.2f} / {np.median(values):5.2f} / {max(values):5.2f}"


def timed_rounds(x, y):
  """The variants' median step times (seconds) in each of --repeats rounds: under
  TensorFlow all variants and the activation-only pass, under JAX the
  cross-entropy and margin steps."""
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
  tensorflow = keras.backend.backend() == "tensorflow"
  calls = {
      name: training_step(build(cls, setting), x, y)
      for name, cls, setting in variants
      if tensorflow or cls is tlm.MarginModel
  }
  if tensorflow:
    calls["forward"], calls["forward+backward"] = activation_backward(tf.constant(x))
  # Round r times every call once, in turn: a change of the machine's load moves
  # all variants of a round together, and each ratio is taken within its round.
  return [
      {name: median_seconds(call, FLAGS.steps) for name, call in calls.items()}
      for _ in range(FLAGS.repeats)
  ]


def jax_rounds():
  """`timed_rounds` under the JAX backend, from a subprocess of this script."""
  command = [sys.executable, os.path.abspath(__file__), "--rounds_json"] + [
      f"--{name}={FLAGS[name].value}" for name in ("batch_size", "steps", "repeats")
  ]
  result = subprocess.run(
      command,
      env=dict(os.environ, KERAS_BACKEND="jax"),
      capture_output=True,
      text=True,
      check=True,
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rounds, reference=None):
  """ms/step and ratios to the rounds' xent (and to ``reference`` ms, if given)."""
  header = f"{'':14s} {'ms/step':>8s}   x xent (min / median / max over rounds)"
  print(header + ("   x TensorFlow xent" if reference else ""))
  for name in rounds[0]:
    seconds = [times[name] for times in rounds]
    ratios = [times[name] / times["xent"] for times in rounds]
    line = f"{name:14s} {np.median(seconds) * 1e3:8.1f}   {spread(ratios)}"
    if reference:
      line += f"   {np.median(seconds) * 1e3 / reference:5.2f}"
    print(line)


def main(_):
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(FLAGS.batch_size, 28, 28, 1)).astype("float32")
  y = rng.integers(0, 10, size=FLAGS.batch_size)
  rounds = timed_rounds(x, y)
  if FLAGS.rounds_json:
    print(json.dumps(rounds))
    return
  for times in rounds:
    backward = times.pop("forward+backward") - times.pop("forward")
    times["floor k=1"] = times["xent"] + backward
    times["floor k=9"] = times["xent"] + 9 * backward
    times["backward pass"] = backward
  print(machine())
  print(
      f"batch {FLAGS.batch_size}, {FLAGS.repeats} round(s) of {FLAGS.steps} steps per "
      f"variant, {len(tf.config.list_logical_devices('CPU'))} CPU device(s), "
      f"jit_compile={FLAGS.jit_compile}"
  )
  print_table(rounds)
  print(
      "backward pass: one activation-only backward pass (logits to the margin layers)"
  )
  for k in (1, 9):
    speedups = [times[f"original k={k}"] / times[f"margin k={k}"] for times in rounds]
    print(
        f"k={k}: margin step is {spread(speedups)}x faster than the original "
        "formulation"
    )
  if FLAGS.backend == "jax":
    import jax  # pylint: disable=import-outside-toplevel

    print(f"JAX {jax.__version__} (jit_compile=True), the same network and batch:")
    print_table(jax_rounds(), np.median([t["xent"] for t in rounds]) * 1e3)


if __name__ == "__main__":
  app.run(main)
