"""The examples' settings (examples/config.py) and runner pieces, in process."""

import math
import sys

from absl import flags
import keras
import numpy as np
import pytest

import tf_large_margin as tlm

from example_runs import EXAMPLES

sys.path.insert(0, EXAMPLES)
import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import runner  # pylint: disable=g-import-not-at-top,wrong-import-position
import training  # pylint: disable=g-import-not-at-top,wrong-import-position


def parsed(argv, defaults=None, names=None):
  """Fresh flags of ``define_flags(defaults, names)`` parsed from ``argv``."""
  flag_values = flags.FlagValues()
  config_lib.define_flags(defaults, names, module_name="test", flag_values=flag_values)
  flag_values(["test"] + list(argv))
  return flag_values


def test_run_config_defaults_norms_and_json():
  config = config_lib.RunConfig()
  assert (config.loss, config.learning_rate) == ("margin", 0.1)
  assert config.dist_norm == math.inf
  assert config.margin_layers == ("input", "conv0", "conv1")
  assert config_lib.RunConfig(dist_norm="2").dist_norm == 2
  changed = config.replace(dist_norm="1", margin_layers=["input"])
  assert (changed.dist_norm, changed.margin_layers) == (1, ("input",))
  values = config.to_json()
  assert values["dist_norm"] == "inf" and values["lr_boundaries"] == (0.5, 0.75)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(loss="softmax"), r"loss must be one of"),
        (dict(dist_norm="3"), r"A norm must be one of 1, 2, inf; got '3'"),
        (dict(optimizer="sgd"), r"optimizer must be one of"),
    ],
)
def test_run_config_rejects_unknown_values(changes, message):
  with pytest.raises(ValueError, match=message):
    config_lib.RunConfig(**changes)


def test_flags_take_the_scripts_defaults_and_give_its_config():
  defaults = dict(learning_rate=0.01, dist_norm="2", margin_layers=["input"])
  flag_values = parsed(["--gamma=3", "--dist_norm=inf"], defaults)
  assert flag_values["learning_rate"].default == 0.01
  assert flag_values["dist_norm"].default_as_str == "'2'"
  config = config_lib.from_flags(flag_values)
  assert (config.learning_rate, config.gamma, config.dist_norm) == (0.01, 3.0, math.inf)
  assert config.margin_layers == ("input",)
  with pytest.raises(flags.IllegalFlagValueError, match="A norm must be one of"):
    flag_values(["test", "--dist_norm=3"])


def test_flags_subset_takes_the_others_from_the_defaults():
  flag_values = parsed(["--batch_size=8"], dict(loss="xent"), names=["batch_size"])
  assert "loss" not in flag_values
  config = config_lib.from_flags(flag_values)
  assert (config.batch_size, config.loss) == (8, "xent")


def test_typed_train_steps_win_over_default_epochs():
  defaults = dict(epochs=200)
  assert config_lib.from_flags(parsed([], defaults)).epochs == 200
  config = config_lib.from_flags(parsed(["--train_steps=4"], defaults))
  assert (config.epochs, config.train_steps) == (0, 4)
  with pytest.raises(ValueError, match=r"--epochs=2 and --train_steps=4 conflict"):
    config_lib.from_flags(parsed(["--epochs=2", "--train_steps=4"], defaults))


def test_set_defaults_keeps_typed_flags():
  flag_values = parsed(["--gamma=3"])
  config_lib.set_defaults(
      dict(gamma=1.0, learning_rate=0.5, margin_layers=("input",)), flag_values
  )
  config = config_lib.from_flags(flag_values)
  assert (config.gamma, config.learning_rate) == (3.0, 0.5)
  assert config.margin_layers == ("input",)


def test_to_argv_round_trips():
  values = dict(dist_norm=math.inf, margin_layers=("input", "conv1"), seed=3)
  argv = config_lib.to_argv(values)
  assert argv == ["--dist_norm=inf", "--margin_layers=input,conv1", "--seed=3"]
  config = config_lib.from_flags(parsed(argv))
  assert (config.dist_norm, config.margin_layers, config.seed) == (
      math.inf,
      ("input", "conv1"),
      3,
  )
  assert config_lib.to_argv(dict(tfds_download=False)) == ["--tfds_download=false"]


def test_load_splits_names_a_bad_label(monkeypatch):
  """Labels from any source are checked where they enter the runner."""
  x = np.zeros((4, 28, 28, 1), np.uint8)
  monkeypatch.setattr(
      runner.datasets,
      "load_dataset",
      lambda *args: (x, np.array([0, 1, 10, 2]), x, np.arange(4)),
  )
  with pytest.raises(
      ValueError, match=r"mnist training labels: label 10 at index 2 is outside 0\.\.9"
  ):
    runner.load_splits("mnist", config_lib.RunConfig())


def test_the_network_must_have_one_output_per_class():
  inputs = keras.Input((4,))
  network = keras.Model(inputs, keras.layers.Dense(3)(inputs))
  runner.check_outputs(network, 3)
  with pytest.raises(ValueError, match=r"network has 3 outputs but the data have 10"):
    runner.check_outputs(network, 10)


def test_margin_setting_and_compiled_loss():
  config = config_lib.RunConfig(gamma=2.0, dist_norm="2")
  margin = runner.make_margin(config)
  assert isinstance(margin, tlm.LayerMargin)
  assert (margin.gamma, margin.dist_norm) == (2.0, 2)
  assert (margin.top_k, margin.worst_case_loss) == (1, True)  # the original's
  summed = runner.make_margin(config.replace(top_k=9, worst_case_loss=False))
  assert (summed.top_k, summed.worst_case_loss) == (9, False)
  assert runner.make_loss(config) is None  # the margin alone
  xent = runner.make_loss(config.replace(xent_weight=0.5))
  assert isinstance(xent, keras.losses.SparseCategoricalCrossentropy)
  assert runner.make_margin(config.replace(loss="hinge")) is None


def test_schedule():
  config = config_lib.RunConfig(train_steps=10, steps_per_loop=5, batch_size=16)
  assert training.schedule(config, 100) == (2, 5)
  assert training.schedule(config.replace(epochs=3), 100) == (3, 6)
  with pytest.raises(ValueError, match=r"--steps_per_loop=3 must divide"):
    training.schedule(config.replace(steps_per_loop=3), 100)


def test_progress_header():
  progress = training.LoopProgress(3, 10, False, 16, 200)
  assert progress.header(0) == (
      "Loop 1/3 (steps 1-10 of 30; 0.8 passes over the training set by its end)"
  )
  progress.start_step = 15  # resumed inside loop 2
  assert progress.header(1).startswith("Loop 2/3 (steps 16-20 of 30;")
  assert training.LoopProgress(3, 12, True, 16, 200).header(1) == "Epoch 2/3"
