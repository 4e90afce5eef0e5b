"""MarginModel: its step against a hand-written one, the compiled loss beside the
margin term, from_logits, serialisation, errors, precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import margin_loss

CLASSES = 4


def data(n=24, seed=0):
  rng = np.random.default_rng(seed)
  return (
      rng.normal(size=(n, 6, 6, 1)).astype("float32"),
      rng.integers(0, CLASSES, size=n),
  )


def functional(seed=1, dtype=None, softmax=False):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6, 6, 1))
  h = keras.layers.Conv2D(3, 3, activation="tanh", name="conv0")(inputs)
  h = keras.layers.Dense(
      8, activation="tanh", name="fc", kernel_regularizer=keras.regularizers.L2(1e-2)
  )(keras.layers.Flatten()(h))
  logits = keras.layers.Dense(CLASSES, name="logits", dtype=dtype)(h)
  if softmax:
    return inputs, keras.layers.Softmax(name="probs")(logits)
  return inputs, logits


def cross_entropy():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


LOSS_KWARGS = dict(
    gamma=0.3,
    alpha_factor=3.0,
    top_k=2,
    dist_norm=np.inf,
    worst_case_loss=False,
    epsilon=1e-6,
)


@pytest.mark.parametrize("layers_weights", [None, "size", [2.0, 0.5, 1.0]])
def test_step_equals_hand_written_step(layers_weights):
  x, y = data()
  sample_weight = np.linspace(0.0, 2.0, len(y)).astype("float32")
  model = tlm.MarginModel(
      *functional(),
      margin=tlm.LayerMargin(**LOSS_KWARGS),
      margin_layers=["input", "conv0", "fc"],
      layers_weights=layers_weights
  )
  reference = keras.Model(*functional())  # same seed: same initial weights
  for a, b in zip(model.get_weights(), reference.get_weights()):
    np.testing.assert_array_equal(a, b)
  lr, xent_weight = 0.1, 0.7
  model.compile(keras.optimizers.SGD(lr), loss=cross_entropy(), loss_weights=xent_weight)
  logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)

  # By hand: explicit tapes, the conv/fc activations from the reference model.
  weights = [36.0, 48.0, 8.0] if layers_weights == "size" else layers_weights
  probe = keras.Model(
      reference.inputs,
      [
          reference.get_layer("conv0").output,
          reference.get_layer("fc").output,
          reference.output,
      ],
  )
  xt = tf.constant(x)
  with tf.GradientTape() as outer:
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(xt)
      conv, fc, logits = probe(xt, training=True)
    one_hot = tf.one_hot(y, CLASSES)
    per_example = margin_loss.large_margin_per_example(
        logits=logits,
        one_hot_labels=one_hot,
        layers_list=[xt, conv, fc],
        layers_weights=weights,
        tape=tape,
        **LOSS_KWARGS
    )
    xent = tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
    margin_part = tf.reduce_sum(per_example * sample_weight) / len(y)
    xent_part = tf.reduce_sum(xent * sample_weight) / len(y)
    total = margin_part + xent_weight * xent_part + tf.add_n(reference.losses)
  grads = outer.gradient(total, reference.trainable_weights)
  np.testing.assert_allclose(logs["loss"], total.numpy(), rtol=1e-5)
  np.testing.assert_allclose(logs["margin"], margin_part.numpy(), rtol=1e-5)
  assert set(logs) == {"loss", "margin"}
  for w, g, new in zip(reference.trainable_weights, grads, model.trainable_weights):
    np.testing.assert_allclose(new.numpy(), w.numpy() - lr * g.numpy(), atol=1e-6)


def test_other_losses_train_as_keras_model():
  x, y = data()
  model = tlm.MarginModel(*functional(), margin_layers=["conv0"])
  reference = keras.Model(*functional())
  logs = {}
  for name, m in (("margin_model", model), ("keras_model", reference)):
    m.compile(keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    logs[name] = m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False).history
  assert set(logs["margin_model"]) == {"loss"}  # no margin / xent logs
  for a, b in zip(model.get_weights(), reference.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_save_load_round_trip(tmp_path):
  x, y = data()
  model = tlm.MarginModel(
      *functional(),
      margin=tlm.LayerMargin(gamma=0.5, dist_norm="inf", aggregation=3),
      margin_layers=["input", "fc"],
      layers_weights=[1.0, 3.0],
  )
  model.compile(keras.optimizers.Adam(1e-2), loss=cross_entropy(), metrics=["accuracy"])
  model.fit(x, y, epochs=1, verbose=0)
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, tlm.MarginModel)
  assert loaded.margin_layers == ["input", "fc"]
  assert loaded.layers_weights == [1.0, 3.0]
  assert isinstance(loaded.margin, tlm.LayerMargin)
  assert loaded.margin.get_config() == model.margin.get_config()
  assert loaded.margin.dist_norm == np.inf
  np.testing.assert_array_equal(
      loaded.predict(x, verbose=0), model.predict(x, verbose=0)
  )
  # Training goes on identically (optimizer state included).
  logs = [m.train_on_batch(x, y, return_dict=True) for m in (model, loaded)]
  np.testing.assert_allclose(logs[0]["loss"], logs[1]["loss"], rtol=1e-6)
  np.testing.assert_allclose(
      loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
  )


def test_from_model_wraps_sequential_and_shares_layers():
  x, y = data()
  keras.utils.set_random_seed(0)
  sequential = keras.Sequential(
      [
          keras.Input((6, 6, 1)),
          keras.layers.Flatten(),
          keras.layers.Dense(5, activation="tanh", name="h"),
          keras.layers.Dense(CLASSES, name="out"),
      ]
  )
  model = tlm.MarginModel.from_model(
      sequential, margin_layers=["input", "h"], margin=tlm.LayerMargin(gamma=1.0)
  )
  model.compile(keras.optimizers.SGD(0.5), loss=None)
  before = sequential.get_weights()
  model.fit(x, y, epochs=1, verbose=0)
  after = sequential.get_weights()
  assert max(np.abs(a - b).max() for a, b in zip(before, after)) > 1e-4
  np.testing.assert_array_equal(
      model.predict(x, verbose=0), sequential.predict(x, verbose=0)
  )


class Endpoints(tlm.MarginTraining, keras.Model):
  """A subclassed model exposing its hidden activation through margin_endpoints."""

  def __init__(self, **kwargs):
    super().__init__(
        margin=tlm.LayerMargin(gamma=1.0), margin_layers=["input", "hidden"], **kwargs
    )
    self.flatten = keras.layers.Flatten()
    self.hidden = keras.layers.Dense(5, activation="tanh")
    self.out = keras.layers.Dense(CLASSES)

  def margin_endpoints(self, x, training=False):
    h = self.hidden(self.flatten(x))
    return self.out(h), [h]

  def call(self, x, training=False):
    return self.margin_endpoints(x, training)[0]


def test_subclassed_model_trains_through_margin_endpoints():
  x, y = data()
  model = Endpoints()
  model.compile(keras.optimizers.SGD(0.5), loss=None)
  first = model.evaluate(x, y, verbose=0, return_dict=True)["margin"]
  model.fit(x, y, epochs=5, verbose=0)
  assert model.evaluate(x, y, verbose=0, return_dict=True)["margin"] < first


class TwoOutputs(keras.layers.Layer):

  def call(self, x):
    return x, -x


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda i, o: tlm.MarginModel(i, o, margin_layers=["nope"]),
            r"Unknown layer 'nope'.*'conv0'",
        ),
        (
            lambda i, o: tlm.MarginModel(i, o, margin_layers=[]),
            "margin_layers is empty",
        ),
        (
            lambda i, o: tlm.MarginModel(
                i, o, margin_layers=["input", "fc"], layers_weights=[1.0]
            ),
            "layers_weights has 1 entries but layers_list has 2",
        ),
        (
            lambda i, o: tlm.MarginModel(
                i, o, margin_layers=["fc"], layers_weights=[-1.0]
            ),
            r"layers_weights\[0\] = -1",
        ),
    ],
)
def test_bad_margin_layers(make, match):
  with pytest.raises(ValueError, match=match):
    make(*functional())


def test_layer_with_several_outputs_and_shared_layer_rejected():
  inputs = keras.Input((4,))
  a, b = TwoOutputs(name="two")(inputs)
  shared = keras.layers.Dense(4, name="shared")
  logits = keras.layers.Dense(CLASSES)(shared(shared(a + b)))
  with pytest.raises(ValueError, match="'two' has several outputs"):
    tlm.MarginModel(inputs, logits, margin_layers=["two"])
  with pytest.raises(ValueError, match="'shared' is called several times"):
    tlm.MarginModel(inputs, logits, margin_layers=["shared"])


def test_input_is_ambiguous_with_two_inputs():
  a, b = keras.Input((3,)), keras.Input((3,))
  logits = keras.layers.Dense(CLASSES)(keras.layers.Concatenate()([a, b]))
  with pytest.raises(ValueError, match="'input' is ambiguous for a model with 2"):
    tlm.MarginModel([a, b], logits)


def test_layer_logits_do_not_depend_on_is_named():
  inputs = keras.Input((4,))
  h = keras.layers.Dense(4, name="h")(inputs)
  blocked = keras.layers.Lambda(tf.stop_gradient, name="blocked")(h)
  logits = keras.layers.Dense(CLASSES)(blocked)
  model = tlm.MarginModel(
      inputs, logits, margin=tlm.LayerMargin(), margin_layers=["h"]
  )
  model.compile("sgd", loss=None)
  with pytest.raises(ValueError, match=r"do not depend on layers_list\[0\].*\['h'\]"):
    model.train_on_batch(np.zeros((2, 4), "float32"), np.zeros(2))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_is_finite_and_close_to_float32(policy):
  x, y = data()
  results = {}
  for name in ("float32", policy):
    keras.mixed_precision.set_dtype_policy(name)
    try:
      model = tlm.MarginModel(
          *functional(),
          margin=tlm.LayerMargin(gamma=0.3),
          margin_layers=["input", "conv0", "fc"],
      )
      model.compile(keras.optimizers.SGD(0.1), loss=cross_entropy())
      results[name] = [model.train_on_batch(x, y, return_dict=True) for _ in range(3)]
      if name != "float32":
        assert model.compute_dtype == keras.mixed_precision.dtype_policy().compute_dtype
        if name == "mixed_float16":
          assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    finally:
      keras.mixed_precision.set_dtype_policy("float32")
  for mixed, full in zip(results[policy], results["float32"]):
    assert np.isfinite(mixed["loss"]) and np.isfinite(mixed["margin"])
    np.testing.assert_allclose(mixed["loss"], full["loss"], rtol=0.05)


def one_step(model, x, y, lr=0.1, loss=None, **compile_kwargs):
  """The logs and the weights after one SGD step."""
  model.compile(keras.optimizers.SGD(lr), loss=loss, **compile_kwargs)
  logs = model.train_on_batch(x, y, return_dict=True)
  return logs, model.get_weights()


@pytest.mark.parametrize(
    "structure", [lambda l: l, lambda l: [l], lambda l: {"logits": l}]
)
def test_compiled_loss_of_any_keras_structure_is_added(structure):
  x, y = data()
  results = []
  for loss in (cross_entropy(), structure(cross_entropy())):
    model = tlm.MarginModel(
        *functional(), margin=tlm.LayerMargin(gamma=0.3), margin_layers=["fc"]
    )
    results.append(one_step(model, x, y, loss=loss, loss_weights=0.5))
  (logs, weights), (logs_structured, weights_structured) = results
  assert logs == logs_structured
  for a, b in zip(weights, weights_structured):
    np.testing.assert_array_equal(a, b)
  alone, _ = one_step(
      tlm.MarginModel(
          *functional(), margin=tlm.LayerMargin(gamma=0.3), margin_layers=["fc"]
      ),
      x,
      y,
  )
  assert logs["margin"] == alone["margin"]
  assert logs["loss"] > alone["loss"]


def test_compute_loss_without_activations_makes_its_own_forward_pass():
  x, y = data()
  model = tlm.MarginModel(
      *functional(),
      margin=tlm.LayerMargin(gamma=0.3, top_k=2),
      margin_layers=["input", "conv0"],
  )
  model.compile("sgd", loss=cross_entropy())
  total, _ = model.total_loss(x, y, training=False)
  np.testing.assert_allclose(
      model.compute_loss(x, y, model(x), training=False), total, rtol=1e-6
  )


@pytest.mark.parametrize(
    "loss",
    [
        tlm.LargeMarginLoss(gamma=1.0),
        [tlm.LargeMarginLoss(gamma=1.0)],
        {"logits": tlm.LargeMarginLoss(gamma=1.0)},
    ],
)
def test_large_margin_loss_without_a_margin_setting_is_an_error(loss):
  """No silent fallback: the hidden-layer margin is the model's setting."""
  model = tlm.MarginModel(*functional(), margin_layers=["input", "fc"])
  with pytest.raises(ValueError, match=r"margin=None.*LargeMarginLoss.*LayerMargin"):
    model.compile("sgd", loss=loss)


def test_margin_must_be_a_layer_margin():
  with pytest.raises(TypeError, match="margin must be a tf_large_margin.LayerMargin"):
    tlm.MarginModel(*functional(), margin=tlm.LargeMarginLoss())


def test_softmax_output_needs_from_logits_false():
  with pytest.raises(ValueError, match="'probs' applies a softmax.*from_logits=False"):
    tlm.MarginModel(*functional(softmax=True), margin=tlm.LayerMargin())


def test_probabilities_model_gets_the_logits_models_margin():
  """from_logits=False on a softmax output: the margin and the step of the same
  network without its softmax (softmax(log p) = p)."""
  x, y = data()
  kwargs = dict(gamma=0.3, top_k=2, dist_norm="inf")
  layers = ["input", "conv0", "fc"]
  logits_model = tlm.MarginModel(
      *functional(), margin=tlm.LayerMargin(**kwargs), margin_layers=layers
  )
  probs_model = tlm.MarginModel(
      *functional(softmax=True),
      margin=tlm.LayerMargin(from_logits=False, **kwargs),
      margin_layers=layers,
  )
  (logs, weights), (probs_logs, probs_weights) = [
      one_step(m, x, y) for m in (logits_model, probs_model)
  ]
  np.testing.assert_allclose(probs_logs["margin"], logs["margin"], rtol=1e-5)
  np.testing.assert_allclose(probs_logs["loss"], logs["loss"], rtol=1e-5)
  for a, b in zip(probs_weights, weights):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_dist_norm_inf_string_equals_np_inf():
  x, y = data()
  results = [
      one_step(
          tlm.MarginModel(
              *functional(),
              margin=tlm.LayerMargin(gamma=0.3, dist_norm=dist_norm),
              margin_layers=["input", "fc"],
          ),
          x,
          y,
      )
      for dist_norm in ("inf", np.inf, float("inf"))
  ]
  for logs, weights in results[1:]:
    assert logs == results[0][0]
    for a, b in zip(weights, results[0][1]):
      np.testing.assert_array_equal(a, b)
