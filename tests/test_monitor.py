"""MarginMonitor: logged values against direct margin_estimation.py calls, event files, plot."""

import csv
import glob
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import margin_estimation
from tf_large_margin import monitor

DIM = 5
CLASSES = 3
LAYERS = ["input", "hidden"]


def separable_data(n, seed=0):
  """Random inputs labelled by a random linear classifier (linearly separable)."""
  rng = np.random.default_rng(seed)
  w = np.random.default_rng(123).normal(size=(DIM, CLASSES))
  x = rng.normal(size=(n, DIM)).astype("float32")
  return x, np.argmax(x @ w, axis=1)


def margin_model(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((DIM,))
  hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
  logits = keras.layers.Dense(CLASSES, name="logits")(hidden)
  model = tlm.MarginModel(
      inputs,
      logits,
      margin=tlm.LayerMargin(gamma=1.0, dist_norm=2),
      margin_layers=LAYERS,
  )
  model.compile(
      keras.optimizers.Adam(0.01),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"],
  )
  return model


def fit(model, callbacks, epochs=3):
  x, y = separable_data(256)
  return model.fit(x, y, batch_size=32, epochs=epochs, callbacks=callbacks, verbose=0)


def read_events(log_dir):
  """[(step, tag, plugin name, value array)] of every summary in ``log_dir``."""
  events = []
  for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        events.append(
            (
                event.step,
                value.tag,
                value.metadata.plugin_data.plugin_name,
                tf.make_ndarray(value.tensor),
            )
        )
  return events


def statistics_by_hand(values, correct):
  values = values[correct].astype(np.float64)
  return np.median(values), np.quantile(values, 0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A MarginModel trained 3 epochs with a monitor measuring every epoch."""
  log_dir = str(tmp_path_factory.mktemp("logs"))
  plot_path = str(tmp_path_factory.mktemp("plot") / "margins.png")
  x_val, y_val = separable_data(80, seed=1)
  model = margin_model()
  margin_monitor = monitor.MarginMonitor(
      x_val,
      y_val,
      log_dir=log_dir,
      num_examples=60,
      batch_size=64,
      deepfool=True,
      plot_path=plot_path,
  )
  history = fit(model, [margin_monitor])
  return dict(
      model=model,
      monitor=margin_monitor,
      history=history.history,
      x=x_val[:60],
      y=y_val[:60],
      log_dir=log_dir,
      plot_path=plot_path,
  )


def expected_keys(names):
  return {f"{s}/{name}" for name in names for s in ("margin_median", "margin_p10")}


def test_logs_the_expected_keys(trained):
  keys = expected_keys(LAYERS + ["linearized", "deepfool"])
  assert set(trained["monitor"].keys) == keys
  assert keys <= set(trained["history"])
  for key in keys:
    assert len(trained["history"][key]) == 3
    assert all(math.isfinite(v) for v in trained["history"][key])
  assert trained["monitor"].measured_epochs == [0, 1, 2]


def test_values_equal_direct_margin_calls(trained):
  model, x, y = trained["model"], trained["x"], trained["y"]
  history = trained["history"]
  first_order, correct = margin_estimation.first_order_margins(model, x, y, LAYERS)
  direct = dict(first_order)
  direct["linearized"] = margin_estimation.linearized_margins(model, x, y)
  direct["deepfool"] = margin_estimation.deepfool(model, x, y)[1]
  assert 0.8 < correct.mean() < 1.0  # some correct examples and some errors
  latest = trained["monitor"].margins
  np.testing.assert_array_equal(latest["correct"], correct)
  for name, values in direct.items():
    np.testing.assert_array_equal(latest[name], values)
    median, p10 = statistics_by_hand(values, correct)
    assert history[f"margin_median/{name}"][-1] == median
    assert history[f"margin_p10/{name}"][-1] == p10
    assert trained["monitor"].statistics[f"margin_median/{name}"] == median
  # The first-order margins are at the input and the hidden layer: they differ.
  assert not np.allclose(direct["input"], direct["hidden"])


def test_statistics_are_those_of_summarize_margins(trained):
  latest = trained["monitor"].margins
  summary = margin_estimation.summarize_margins(latest, quantiles=(0.1,))
  for name, values in summary.items():
    assert trained["monitor"].statistics[f"margin_median/{name}"] == values["median"]
    assert trained["monitor"].statistics[f"margin_p10/{name}"] == (
        values["quantiles"]["0.1"]
    )


def test_event_files_hold_histograms_and_scalars(trained):
  events = read_events(trained["log_dir"])
  names = LAYERS + ["linearized", "deepfool"]
  histograms = {(s, t) for s, t, plugin, _ in events if plugin == "histograms"}
  assert histograms == {
      (step, f"margin_distribution/{name}") for step in range(3) for name in names
  }
  scalars = {(s, t): v for s, t, plugin, v in events if plugin == "scalars"}
  assert set(scalars) == {
      (step, key) for step in range(3) for key in expected_keys(names)
  }
  for (step, key), value in scalars.items():
    assert value == np.float32(trained["history"][key][step])
  # The last histogram holds the correct examples' finite margins.
  latest = trained["monitor"].margins
  last = [
      v
      for s, t, plugin, v in events
      if plugin == "histograms" and s == 2 and t == "margin_distribution/linearized"
  ][0]
  # Histogram buckets [left, right, count]: the counts sum to the number of values.
  assert last.shape[1] == 3
  assert last[:, 2].sum() == latest["correct"].sum()


def test_plot_is_a_png(trained):
  with open(trained["plot_path"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(trained["plot_path"]) > 1000


def test_every_n_epochs_and_csv_logger(tmp_path):
  x_val, y_val = separable_data(40, seed=2)
  margin_monitor = monitor.MarginMonitor(
      x_val,
      y_val,
      log_dir=str(tmp_path / "logs"),
      every_n_epochs=2,
      batch_size=16,  # several batches
      plot_path=str(tmp_path / "final.png"),
  )
  csv_path = str(tmp_path / "log.csv")
  model = margin_model(seed=3)
  history = fit(
      model, [margin_monitor, keras.callbacks.CSVLogger(csv_path)], epochs=5
  ).history
  assert margin_monitor.measured_epochs == [1, 3]
  for key in expected_keys(LAYERS + ["linearized"]):
    values = history[key]
    assert [math.isnan(v) for v in values] == [True, False, True, False, True]
  steps = {s for s, _, _, _ in read_events(str(tmp_path / "logs"))}
  assert steps == {1, 3}
  with open(csv_path) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 5
  assert float(rows[3]["margin_median/linearized"]) == pytest.approx(
      history["margin_median/linearized"][3]
  )
  # Epoch 5 was not measured: the plot shows the final weights' margins.
  assert os.path.exists(tmp_path / "final.png")
  batched = [(x_val[i : i + 16], y_val[i : i + 16]) for i in range(0, 40, 16)]
  direct = margin_estimation.dataset_margins(model, batched, LAYERS, deepfool_steps=0)
  for name in ("correct", "input", "hidden", "linearized"):
    np.testing.assert_array_equal(margin_monitor.margins[name], direct[name])


def test_plain_keras_model_monitors_the_input_only(tmp_path):
  keras.utils.set_random_seed(4)
  model = keras.Sequential(
      [
          keras.Input((DIM,)),
          keras.layers.Dense(8, activation="tanh"),
          keras.layers.Dense(CLASSES),
      ]
  )
  model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x_val, y_val = separable_data(30, seed=5)
  one_hot = np.eye(CLASSES)[y_val]
  margin_monitor = monitor.MarginMonitor(x_val, one_hot, num_examples=100)
  history = fit(model, [margin_monitor], epochs=2).history
  assert set(margin_monitor.keys) == expected_keys(["input", "linearized"])
  first_order, correct = margin_estimation.first_order_margins(model, x_val, y_val)
  median, _ = statistics_by_hand(first_order["input"], correct)
  assert history["margin_median/input"][-1] == median


def test_layers_argument_overrides_the_margin_layers():
  x_val, y_val = separable_data(20, seed=6)
  model = margin_model()
  margin_monitor = monitor.MarginMonitor(x_val, y_val, layers="hidden")
  fit(model, [margin_monitor], epochs=1)
  assert set(margin_monitor.keys) == expected_keys(["hidden", "linearized"])


class TestErrors:

  def setup_method(self):
    self.x, self.y = separable_data(10)

  @pytest.mark.parametrize(
      "kwargs, match",
      [
          (dict(num_examples=0), "num_examples"),
          (dict(num_examples=2.5), "num_examples"),
          (dict(every_n_epochs=0), "every_n_epochs"),
          (dict(every_n_epochs=True), "every_n_epochs"),
          (dict(batch_size=-1), "batch_size"),
          (dict(dist_norm=3), "dist_norm"),
          (dict(deepfool="yes"), "deepfool"),
          (dict(deepfool_steps=0), "deepfool_steps"),
          (dict(overshoot=-0.1), "overshoot"),
          (dict(layers=[]), "layers is empty"),
          (dict(layers=["linearized"]), "reserved"),
          (dict(log_dir=""), "log_dir"),
          (dict(plot_path=3), "plot_path"),
      ],
  )
  def test_bad_arguments(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      monitor.MarginMonitor(self.x, self.y, **kwargs)

  def test_bad_data(self):
    with pytest.raises(ValueError, match="same number of examples"):
      monitor.MarginMonitor(self.x, self.y[:5])
    with pytest.raises(ValueError, match="non-empty"):
      monitor.MarginMonitor(self.x[:0], self.y[:0])
    with pytest.raises(ValueError, match="integer dtype"):
      monitor.MarginMonitor(self.x, self.y.astype("float32"))
    with pytest.raises(ValueError, match="shape"):
      monitor.MarginMonitor(self.x, self.y.reshape(10, 1, 1))

  def test_unknown_layer_fails_before_training(self):
    model = margin_model()
    margin_monitor = monitor.MarginMonitor(self.x, self.y, layers=["nope"])
    with pytest.raises(ValueError, match="Unknown layer 'nope'"):
      fit(model, [margin_monitor], epochs=1)


def activity_model(gamma, score="probabilities"):
  model = margin_model()
  model.margin = tlm.LayerMargin(gamma=gamma, dist_norm=2, alpha_factor=2.0, score=score)
  return model


def input_distances_by_hand(model, x, y, score):
  """Eq. 10 at the input, top_k=1, example by example with its own tape."""
  distances = []
  for xi, yi in zip(x, y):
    xi = tf.constant(xi[None])
    with tf.GradientTape() as tape:
      tape.watch(xi)
      logits = model(xi, training=False)
      values = tf.nn.softmax(logits) if score == "probabilities" else logits
      others = tf.tensor_scatter_nd_update(values[0], [[yi]], [-np.inf])
      j = int(tf.argmax(others))
      gap = values[0, yi] - values[0, j]
    grad = tape.gradient(gap, xi).numpy().ravel()
    distances.append(float(gap) / (1e-6 + np.linalg.norm(grad, 2)))
  return np.array(distances)


@pytest.mark.parametrize("score", ["probabilities", "logits"])
def test_layer_distances_at_the_input_match_a_per_example_loop(score):
  model = activity_model(1.0, score)
  model.margin_layers = ["input"]
  x, y = separable_data(12, seed=2)
  (distances,) = model.layer_distances(x, y)
  np.testing.assert_allclose(
      distances.numpy()[:, 0], input_distances_by_hand(model, x, y, score), rtol=1e-4
  )


def test_margin_activity_logs_the_active_fraction_of_the_layer_distances():
  x, y = separable_data(40, seed=3)
  model = activity_model(gamma=1.0)
  activity = monitor.MarginActivity(x, y, num_examples=30, batch_size=7)
  activity.set_model(model)
  logs = {}
  activity.on_epoch_end(0, logs)
  assert set(logs) == {f"{k}/{n}" for n in LAYERS for k in ("margin_active", "margin_distance_median")}
  for name, d in zip(LAYERS, model.layer_distances(x[:30], y[:30])):
    d = d.numpy().min(axis=1)
    inside = (d > 1.0 * (1 - 2.0)) & (d < 1.0)
    assert logs[f"margin_active/{name}"] == pytest.approx(inside.mean())
    assert logs[f"margin_distance_median/{name}"] == pytest.approx(np.median(d), rel=1e-6)
  # A gamma far beyond every distance: the hinge binds everywhere above the clip.
  model.margin = tlm.LayerMargin(gamma=1e9, dist_norm=2, alpha_factor=2.0)
  assert activity.measure()["margin_active/input"] == 1.0


def test_margin_activity_in_fit_history():
  x, y = separable_data(64, seed=4)
  model = activity_model(gamma=1.0)
  history = fit(model, [monitor.MarginActivity(x, y, num_examples=64)], epochs=2)
  assert len(history.history["margin_active/hidden"]) == 2
  assert all(0.0 <= v <= 1.0 for v in history.history["margin_active/input"])
