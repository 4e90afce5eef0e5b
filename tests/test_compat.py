"""The Keras internals `tf_large_margin.compat` relies on still exist and still work.

Each failure names the Keras version: update `tf_large_margin/compat.py` for it.
"""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm
from tf_large_margin import compat


def broken(what):
  return (
      f"Keras {keras.version()} (TensorFlow {tf.__version__}): {what}; "
      "tf_large_margin/compat.py needs updating for this version."
  )


def small_model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  logits = keras.layers.Dense(3)(keras.layers.Dense(5, name="h")(inputs))
  return tlm.MarginModel(
      inputs, logits, margin=tlm.LayerMargin(gamma=1.0), margin_layers=["h"]
  )


def cross_entropy():
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dataset():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16)
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


def test_every_private_name_is_listed_and_exists():
  assert compat.PRIVATE_NAMES == (
      "keras.Model._maybe_symbolic_build",
      "keras.Model._distribute_strategy",
      "keras.metrics.Metric._direction",
  )
  hook = getattr(keras.Model, "_maybe_symbolic_build", None)
  assert hook is not None, broken("keras.Model._maybe_symbolic_build is gone")
  parameters = list(inspect.signature(hook).parameters)
  assert parameters == ["self", "iterator", "data_batch"], broken(
      f"_maybe_symbolic_build takes {parameters}, not (self, iterator, data_batch)"
  )
  assert hasattr(small_model(), "_distribute_strategy"), broken(
      "a Model has no _distribute_strategy"
  )
  assert getattr(keras.metrics.Accuracy(), "_direction", None) == "up", broken(
      "Keras' metrics no longer set _direction"
  )


@pytest.mark.parametrize("under_strategy", [False, True])
def test_fit_calls_the_build_hook_under_a_strategy_only(monkeypatch, under_strategy):
  """MultiWorkerFit: Keras calls `_maybe_symbolic_build` before the first step,
  and `_distribute_strategy` is the strategy the model was created under."""
  seen = []
  monkeypatch.setattr(
      compat, "local_batch", lambda batch: seen.append(batch) or batch
  )
  strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
  if under_strategy:
    with strategy.scope():
      model = small_model()
      # A compiled loss: Keras' symbolic build also calls compute_loss.
      model.compile(keras.optimizers.SGD(0.1), loss=cross_entropy())
    assert model._distribute_strategy is strategy, broken(  # pylint: disable=protected-access
        "_distribute_strategy is not the creating strategy"
    )
  else:
    model = small_model()
    model.compile(keras.optimizers.SGD(0.1), loss=cross_entropy())
    assert model._distribute_strategy is None, broken(  # pylint: disable=protected-access
        "_distribute_strategy is set outside a strategy scope"
    )
  history = model.fit(dataset(), epochs=1, shuffle=False, verbose=0).history
  assert np.isfinite(history["loss"][0]) and "margin" in history
  assert len(seen) == int(under_strategy), broken(
      f"fit called the _maybe_symbolic_build hook {len(seen)} times "
      f"({'under' if under_strategy else 'outside'} a strategy)"
  )


def test_metric_direction_reaches_the_callbacks():
  """A metric whose name Keras does not know: mode "auto" needs its direction."""
  x, y = np.ones((8, 4), "float32"), np.zeros(8)

  def fit(direction):
    metric = keras.metrics.MeanMetricWrapper(
        fn=lambda y_true, y_pred: y_pred[:, 0], name="hits"
    )
    if direction:
      compat.set_metric_direction(metric, direction)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("sgd", loss="sparse_categorical_crossentropy", metrics=[metric])
    stopping = keras.callbacks.EarlyStopping(monitor="hits", mode="auto")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[stopping])
    return stopping.monitor_op

  assert bool(fit("up")(2.0, 1.0)), broken("_direction 'up' is not read as maximise")
  assert bool(fit("down")(1.0, 2.0)), broken("_direction 'down' is not minimise")
  with pytest.raises(ValueError, match="automatically determine"):
    fit(None)
  with pytest.raises(ValueError, match="direction must be"):
    compat.set_metric_direction(keras.metrics.Mean(), "sideways")


def test_multi_worker_test_agrees_with_keras():
  """`multi_worker` (public API) asks what Keras' private test asks before it
  reduces the logs with axis=0 (issue 20585); a multi-worker cluster is covered
  by tests/test_distribute.py."""
  from keras.src.backend.tensorflow import trainer  # pylint: disable=g-import-not-at-top

  keras_test = getattr(trainer, "_collective_all_reduce_multi_worker", None)
  assert keras_test is not None, broken(
      "_collective_all_reduce_multi_worker is gone: check whether issue 20585 is "
      "fixed and the multi-worker workaround can go"
  )
  for strategy in (
      tf.distribute.get_strategy(),
      tf.distribute.MirroredStrategy(["/cpu:0"]),
  ):
    assert compat.multi_worker(strategy) == bool(keras_test(strategy))
