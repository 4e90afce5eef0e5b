"""`large_margin` against an independent per-example, per-class reference."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import margin_loss
from tf_large_margin import margin_scores

from margin_loss_reference import CLASSES
from margin_loss_reference import TinyNet
from margin_loss_reference import library_distances
from margin_loss_reference import library_loss_eager
from margin_loss_reference import library_loss_graph
from margin_loss_reference import make_data
from margin_loss_reference import reference_loss
from margin_loss_reference import typical_gamma
from margin_loss_reference import value_and_grads


COMBOS = list(
    itertools.product(
        [1, 2, np.inf],
        [1, 3, CLASSES],
        [True, False],
        [True, False],
        [None, [2.0, 0.5, 1.0, 3.0]],
    )
)


@pytest.mark.parametrize(
    "dist_norm,top_k,worst_case_loss,use_approximation,layers_weights", COMBOS
)
def test_matches_per_example_reference(
    dist_norm, top_k, worst_case_loss, use_approximation, layers_weights
):
  net = TinyNet()
  x, labels = make_data()
  kwargs = dict(
      gamma=typical_gamma(net, x, labels),
      alpha_factor=1.5,
      top_k=top_k,
      dist_norm=dist_norm,
      epsilon=1e-6,
      use_approximation=use_approximation,
      worst_case_loss=worst_case_loss,
      layers_weights=layers_weights,
  )
  ref_value, ref_grads = value_and_grads(reference_loss, net, x, labels, kwargs)
  for fn in (library_loss_eager, library_loss_graph):
    value, grads = value_and_grads(fn, net, x, labels, kwargs)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6 * kwargs["gamma"])
    for g, ref in zip(grads, ref_grads):
      np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_clipping_is_active_in_the_reference_setting():
  """The combos above exercise both clips: some distances above gamma, some below
  gamma * (1 - alpha), some in between."""
  net = TinyNet()
  x, labels = make_data()
  gamma = typical_gamma(net, x, labels)
  _, distances = library_distances(net, x, labels, dist_norm=2)
  d = np.concatenate([v.numpy().ravel() for v in distances])
  assert (d > gamma).any()
  assert ((d < gamma) & (d > -0.5 * gamma)).any()


@pytest.mark.parametrize("dist_norm", [1, 2, np.inf])
def test_exact_gradient_matches_finite_differences(dist_norm):
  """use_approximation=False differentiates through the norm (second order)."""
  net = TinyNet(dtype=tf.float64)
  x, labels = make_data(np.float64)
  kwargs = dict(
      gamma=1e3,
      alpha_factor=2.0,
      top_k=2,
      dist_norm=dist_norm,
      epsilon=1e-8,
      use_approximation=False,
      worst_case_loss=False,
  )
  _, grads = value_and_grads(library_loss_eager, net, x, labels, kwargs)
  _, approx_grads = value_and_grads(
      library_loss_eager, net, x, labels, dict(kwargs, use_approximation=True)
  )
  rng = np.random.default_rng(3)
  step = 1e-6
  differs = False
  for w, g, ga in zip(net.weights, grads, approx_grads):
    for index in [tuple(rng.integers(0, s) for s in w.shape) for _ in range(3)]:
      original = w.numpy()
      values = []
      for sign in (1.0, -1.0):
        perturbed = original.copy()
        perturbed[index] += sign * step
        w.assign(perturbed)
        values.append(library_loss_eager(net, x, labels, **kwargs).numpy())
      w.assign(original)
      fd = (values[0] - values[1]) / (2 * step)
      np.testing.assert_allclose(g[index], fd, rtol=1e-5, atol=1e-7)
      differs |= not np.isclose(ga[index], fd, rtol=1e-3)
  assert differs, "the approximate gradient should differ from the exact one"


def test_original_value_includes_minus_gamma():
  """An example far beyond the margin contributes relu(...) - gamma = -gamma."""
  logits = tf.constant([[20.0, 0.0, 0.0]])
  value = margin_loss.large_margin(
      logits=logits,
      one_hot_labels=[[1.0, 0.0, 0.0]],
      layers_list=[logits],
      gamma=1e-3,
      tape=_tape_for(logits),
  )
  np.testing.assert_allclose(value.numpy(), -1e-3, rtol=1e-6)


def _tape_for(logits):
  tape = tf.GradientTape(persistent=True)
  with tape:
    tape.watch(logits)
    out = tf.identity(logits)
  del out
  return tape


def test_logit_space_matches_large_margin_at_logits():
  rng = np.random.default_rng(0)
  logits = tf.constant(rng.normal(size=(6, 4)) * 2, tf.float32)
  one_hot = tf.one_hot(rng.integers(0, 4, 6), 4)
  for dist_norm, top_k in itertools.product([1, 2, np.inf], [1, 2, 4]):
    kwargs = dict(
        gamma=0.5,
        alpha_factor=3.0,
        top_k=top_k,
        dist_norm=dist_norm,
        worst_case_loss=top_k != 2,
    )
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(logits)
      logits_out = logits * 1.0
    expected = margin_loss.large_margin_per_example(
        logits=logits_out,
        one_hot_labels=one_hot,
        layers_list=[logits_out],
        tape=tape,
        **kwargs
    )
    actual = margin_loss.logit_margin_per_example(
        logits=logits, one_hot_labels=one_hot, **kwargs
    )
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6)


def test_top_k_ties_take_lowest_index():
  probs = tf.constant([[0.4, 0.2, 0.2, 0.2]])
  diff, competitors = margin_scores.top_k_probability_differences(
      probs, tf.constant([[1.0, 0.0, 0.0, 0.0]]), 2
  )
  np.testing.assert_array_equal(competitors.numpy(), [[[0, 1, 0, 0], [0, 0, 1, 0]]])
  np.testing.assert_allclose(diff.numpy(), [[0.2, 0.2]])


def original_top1_tie_loss(logits, label, gamma, alpha_factor, epsilon):
  """The original's top_k = 1 loss at the logits, transcribed in numpy.

  Its competitor is reduce_max(p * (1 - one_hot)), whose gradient TensorFlow
  shares equally among tied entries: d(p_y - max)/dp = one_hot - tied / count.
  """
  p = np.exp(logits - logits.max())
  p /= p.sum()
  one_hot = np.eye(len(p))[label]
  others = p * (1 - one_hot)
  tied = (others == others.max()).astype(float)
  v = one_hot - tied / tied.sum() * (1 - one_hot)
  cotangent = p * v - p * (p @ v)  # softmax Jacobian times v
  d = (p[label] - others.max()) / (np.abs(cotangent).sum() + epsilon)  # linf: l1
  return max(0.0, gamma - max(d, gamma * (1 - alpha_factor))) - gamma


def test_top1_exact_ties_share_the_gradient_like_reduce_max():
  """logits [0.5, 2, 2, -1], label 0: classes 1 and 2 tie for the max; the
  original's denominator is |J (e_0 - (e_1 + e_2) / 2)|_1, not |J (e_0 - e_1)|_1."""
  logits = tf.constant([[0.5, 2.0, 2.0, -1.0]], tf.float64)
  one_hot = tf.constant([[1.0, 0.0, 0.0, 0.0]], tf.float64)
  kwargs = dict(gamma=10.0, alpha_factor=4.0, top_k=1, dist_norm=np.inf, epsilon=1e-6)
  with tf.GradientTape() as outer:
    outer.watch(logits)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(logits)
      z = tf.identity(logits)
    loss = margin_loss.large_margin(
        logits=z, one_hot_labels=one_hot, layers_list=[z], tape=tape, **kwargs
    )
  expected = original_top1_tie_loss(
      logits.numpy()[0], 0, 10.0, 4.0, 1e-6
  )
  lowest_index = original_top1_tie_loss(
      np.array([0.5, 2.0, 2.0 - 1e-12, -1.0]), 0, 10.0, 4.0, 1e-6
  )
  assert abs(expected - lowest_index) > 1e-3  # the two rules differ here
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12)
  # Gradient (stop-gradient denominator): d loss / d z = -(1/n) dp/dz (e_0 - tie/2).
  grad = outer.gradient(loss, logits).numpy()[0]
  p = tf.nn.softmax(logits).numpy()[0]
  v = np.array([1.0, -0.5, -0.5, 0.0])
  cotangent = p * v - p * (p @ v)
  norm = np.abs(cotangent).sum()
  np.testing.assert_allclose(grad, -cotangent / (norm + 1e-6), rtol=1e-10)
  np.testing.assert_allclose(
      margin_loss.logit_margin_per_example(logits=logits, one_hot_labels=one_hot, **kwargs),
      [expected],
      rtol=1e-12,
  )


def test_top1_all_other_probabilities_zero_counts_the_label_as_tied():
  """Saturated softmax: every other masked probability is 0, and so is the label's
  masked entry: TF's reduce_max gradient is shared by all C entries, the label's
  share is masked out; the competitor weights are 1/C on the other classes."""
  probs = tf.constant([[1.0, 0.0, 0.0]])
  _, competitors = margin_scores.top_k_probability_differences(
      probs, tf.constant([[1.0, 0.0, 0.0]]), 1
  )
  np.testing.assert_allclose(competitors.numpy(), [[[1 / 3, 1 / 3, 1 / 3]]])


def test_half_precision_logits_give_float32_finite_loss():
  """bfloat16 activations (mixed precision): the margin math runs in float32."""
  net, half_net = TinyNet(), TinyNet(dtype=tf.bfloat16)
  x, labels = make_data()
  half_x = tf.cast(x, tf.bfloat16)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(half_x)
    layers = half_net.layers(half_x)
  loss = margin_loss.large_margin(
      logits=layers[-1],
      one_hot_labels=tf.one_hot(labels, 5),
      layers_list=layers,
      tape=tape,
      gamma=1.0,
  )
  assert loss.dtype == tf.float32
  reference = library_loss_eager(net, x, labels, gamma=1.0)
  assert np.isfinite(loss.numpy())
  np.testing.assert_allclose(loss.numpy(), reference.numpy(), rtol=0.05)


@pytest.mark.parametrize(
    "spelling,expected",
    [
        ("inf", np.inf),
        (" Inf", np.inf),
        (np.inf, np.inf),
        (float("inf"), np.inf),
        (np.float32(np.inf), np.inf),
        (1, 1),
        (2.0, 2),
        (np.int64(2), 2),
    ],
)
def test_check_dist_norm_spellings(spelling, expected):
  value = margin_loss.check_dist_norm(spelling)
  assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("bad", [3, 0, -np.inf, np.nan, True, "2", "l2", None])
def test_check_dist_norm_rejects(bad):
  with pytest.raises(ValueError, match="dist_norm must be 1, 2 or np.inf"):
    margin_loss.check_dist_norm(bad)


def test_dist_norm_inf_string_in_the_margin_functions():
  net = TinyNet()
  x, labels = make_data()
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    layers = net.layers(x)
  kwargs = dict(logits=layers[-1], one_hot_labels=tf.one_hot(labels, CLASSES), top_k=2)
  for function, extra in [
      (margin_loss.large_margin, dict(layers_list=layers, tape=tape)),
      (margin_loss.large_margin_per_example, dict(layers_list=layers, tape=tape)),
      (margin_loss.logit_margin_per_example, {}),
  ]:
    np.testing.assert_array_equal(
        function(dist_norm="inf", **kwargs, **extra),
        function(dist_norm=np.inf, **kwargs, **extra),
    )
  _, with_string = margin_loss.margin_distances(
      dist_norm="inf", layers_list=layers, tape=tape, **kwargs
  )
  _, with_inf = margin_loss.margin_distances(
      dist_norm=np.inf, layers_list=layers, tape=tape, **kwargs
  )
  for a, b in zip(with_string, with_inf):
    np.testing.assert_array_equal(a, b)


def test_loss_computed_while_the_tape_records():
  """Inside the persistent tape's block (`stop_recording` pauses it for the
  backward passes) the tape differentiates the loss as an outer tape does."""
  net = TinyNet(dtype=tf.float64)
  x, labels = make_data(np.float64)
  kwargs = dict(
      one_hot_labels=tf.one_hot(labels, CLASSES, dtype=tf.float64),
      gamma=1e3,
      top_k=2,
      worst_case_loss=False,
  )
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    layers = net.layers(x)
    inside = margin_loss.large_margin(
        logits=layers[-1], layers_list=layers, tape=tape, **kwargs
    )
  inside_grads = tape.gradient(inside, net.weights)
  with tf.GradientTape() as outer:
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      layers = net.layers(x)
    outside = margin_loss.large_margin(
        logits=layers[-1], layers_list=layers, tape=tape, **kwargs
    )
  outside_grads = outer.gradient(outside, net.weights)
  np.testing.assert_allclose(inside, outside, rtol=1e-12)
  for a, b in zip(inside_grads, outside_grads):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


class TestErrors:

  def call(self, **overrides):
    net = TinyNet()
    x, labels = make_data()
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      layers = net.layers(x)
    kwargs = dict(
        logits=layers[-1],
        one_hot_labels=tf.one_hot(labels, CLASSES),
        layers_list=layers,
        tape=tape,
    )
    kwargs.update(overrides)
    return margin_loss.large_margin(**kwargs)

  @pytest.mark.parametrize(
      "overrides,match",
      [
          (dict(dist_norm=3), "dist_norm must be 1, 2 or np.inf"),
          (dict(dist_norm="l2"), "dist_norm"),
          (dict(top_k=0), r"top_k must be in \[1, num_classes=5\]"),
          (dict(top_k=6), r"top_k must be in \[1, num_classes=5\]"),
          (dict(top_k=1.5), "top_k must be an integer"),
          (
              dict(layers_weights=[1.0, 2.0]),
              "layers_weights has 2 entries but layers_list has 4",
          ),
          (dict(layers_weights=[1.0, 0.0, 1.0, 1.0]), r"layers_weights\[1\] = 0"),
          (dict(one_hot_labels=tf.zeros([3, 4])), "same shape"),
          (dict(layers_list=[]), "layers_list is empty"),
          (dict(logits=tf.zeros([3, 5], tf.int32)), "float"),
          (
              dict(layers_list=[tf.zeros([3, 2])]),
              r"logits do not depend on layers_list\[0\]",
          ),
          (dict(tape=None), "pass tape="),
      ],
  )
  def test_bad_input_raises(self, overrides, match):
    with pytest.raises(ValueError, match=match):
      self.call(**overrides)

  def test_non_persistent_tape_with_top_k(self):
    net = TinyNet()
    x, labels = make_data()
    with tf.GradientTape() as tape:
      tape.watch(x)
      layers = net.layers(x)
    with pytest.raises(ValueError, match="persistent=True"):
      margin_loss.large_margin(
          logits=layers[-1],
          one_hot_labels=tf.one_hot(labels, 5),
          layers_list=layers,
          tape=tape,
          top_k=2,
      )

  def test_unconnected_layer_named_in_graph_mode(self):
    @tf.function
    def f(x):
      unrelated = tf.identity(x, name="unrelated_tensor")
      logits = tf.reshape(x * 2.0, [3, 25])[:, :5]
      return margin_loss.large_margin(
          logits=logits,
          one_hot_labels=tf.one_hot([0, 1, 2], 5),
          layers_list=[x, unrelated],
      )

    with pytest.raises(ValueError, match=r"layers_list\[1\] \(unrelated_tensor"):
      f(tf.zeros([3, 5, 5, 1]))
