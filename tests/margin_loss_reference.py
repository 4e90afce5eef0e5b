"""An independent per-example, per-class computation of Eq. 10 (one tape per
example and class) and the small network the margin-loss tests share."""

import numpy as np
import tensorflow as tf

from tf_large_margin import margin_loss

BATCH, CLASSES = 3, 5
# The norm the gradient is measured in, for each distance norm (the spec, stated
# independently of the library's table).
GRADIENT_NORM = {1: np.inf, 2: 2, np.inf: 1}


class TinyNet:
  """x [B,5,5,1] -conv3x3(2), tanh-> h1 -dense(6), tanh-> h2 -dense-> logits."""

  def __init__(self, dtype=tf.float32, seed=0):
    rng = np.random.default_rng(seed)
    self.weights = [
        tf.Variable(rng.normal(size=s) * scale, dtype=dtype)
        for s, scale in [
            ((3, 3, 1, 2), 0.5),
            ((50, 6), 0.3),
            ((6,), 0.1),
            ((6, CLASSES), 0.8),
        ]
    ]

  def layers(self, x):
    conv, dense, bias, out = self.weights
    h1 = tf.tanh(tf.nn.conv2d(x, conv, strides=1, padding="SAME"))
    h2 = tf.tanh(tf.reshape(h1, [tf.shape(x)[0], -1]) @ dense + bias)
    return [x, h1, h2, h2 @ out]  # input, conv, dense, logits


def make_data(dtype=np.float32, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, 5, 5, 1)).astype(dtype)
  y = rng.integers(0, CLASSES, size=BATCH)
  return tf.constant(x), y


def reference_loss(
    net,
    x,
    labels,
    *,
    gamma,
    alpha_factor,
    top_k,
    dist_norm,
    epsilon,
    use_approximation,
    worst_case_loss,
    layers_weights,
    score="probabilities"
):
  """Eq. 10 with one explicit tape per example and per competing class.

  Differentiable w.r.t. the net's weights; the norms are stopped or not. The score
  is the softmax probability (the paper) or, for score="logits", the logit itself.
  """
  def scores_of(logits):
    return logits[0] if score == "logits" else tf.nn.softmax(logits)[0]

  layers_weights = layers_weights or [1.0] * 4
  per_layer = [[] for _ in range(4)]
  for b in range(BATCH):
    xb = x[b : b + 1]
    others = scores_of(net.layers(xb)[-1]).numpy().copy()
    # The label is masked to 0 among the probabilities (the original: with top_k =
    # classes it is the last competitor, p_y - 0), to -inf among the logits.
    others[labels[b]] = -np.inf if score == "logits" else 0.0
    order = sorted(range(CLASSES), key=lambda i: (-others[i], i))[:top_k]
    example_distances = [[] for _ in range(4)]
    for j in order:
      with tf.GradientTape(persistent=True) as tape:
        tape.watch(xb)
        layers = net.layers(xb)
        for h in layers[1:]:
          tape.watch(h)
        p = scores_of(layers[-1])
        diff = p[labels[b]] - p[j] * (0.0 if j == labels[b] else 1.0)
      grads = tape.gradient(diff, layers)
      for l, g in enumerate(grads):
        norm = tf.norm(tf.reshape(g, [-1]), ord=GRADIENT_NORM[dist_norm])
        norm = norm / layers_weights[l]
        if use_approximation:
          norm = tf.stop_gradient(norm)
        example_distances[l].append(diff / (norm + epsilon))
    for l in range(4):
      d = tf.stack(example_distances[l])
      if worst_case_loss:
        d = tf.reduce_min(d, keepdims=True)
      d = tf.maximum(d, gamma * (1.0 - alpha_factor))
      per_layer[l].append(tf.reduce_sum(tf.maximum(0.0, gamma - d) - gamma))
  return tf.reduce_mean([tf.reduce_mean(tf.stack(v)) for v in per_layer])


def library_loss_eager(net, x, labels, **kwargs):
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    layers = net.layers(x)
  return margin_loss.large_margin(
      logits=layers[-1],
      one_hot_labels=tf.one_hot(labels, CLASSES, dtype=x.dtype),
      layers_list=layers,
      tape=tape,
      **kwargs
  )


@tf.function
def _graph_loss(net, x, one_hot, kwargs):
  layers = net.layers(x)
  return margin_loss.large_margin(
      logits=layers[-1], one_hot_labels=one_hot, layers_list=layers, **kwargs
  )


def library_loss_graph(net, x, labels, **kwargs):
  return _graph_loss(net, x, tf.one_hot(labels, CLASSES, dtype=x.dtype), kwargs)


def value_and_grads(fn, net, x, labels, kwargs):
  with tf.GradientTape() as tape:
    loss = fn(net, x, labels, **kwargs)
  return loss.numpy(), [g.numpy() for g in tape.gradient(loss, net.weights)]


def typical_gamma(net, x, labels, score="probabilities"):
  """A gamma in the range of the distances at the input, so that clipping binds."""
  _, distances = library_distances(net, x, labels, score=score)
  return float(np.median(np.abs(distances[0].numpy()))) * 1.5


def library_distances(net, x, labels, **kwargs):
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    layers = net.layers(x)
  return margin_loss.margin_distances(
      logits=layers[-1],
      one_hot_labels=tf.one_hot(labels, CLASSES),
      layers_list=layers,
      tape=tape,
      # All other classes (and, with probabilities, the label's masked 0).
      top_k=CLASSES - 1 if kwargs.get("score") == "logits" else CLASSES,
      **kwargs
  )
