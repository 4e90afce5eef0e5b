"""The example scripts end to end, a few steps each, in fresh processes.

Fresh processes because absl flags are global and logical devices must be
configured before TensorFlow starts.
"""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

# Register the classes saved models refer to.
import tf_large_margin  # pylint: disable=unused-import
import tf_large_margin.optimizers  # pylint: disable=unused-import

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
FAST = ["--train_steps=4", "--steps_per_loop=2", "--batch_size=16", "--verbose=2"]

# Runs an example with a callback that SIGKILLs the process at the end of a loop
# (after the loop's backup was written): argv = [kill_after_loops, script, flags...].
KILLER = """
import os, signal, sys
import keras
sys.path.insert(0, {examples!r})
import common
kill_after_loops = int(sys.argv.pop(1))
sys.argv.pop(0)


class Kill(keras.callbacks.Callback):
  def on_epoch_end(self, epoch, logs=None):
    if epoch + 1 == kill_after_loops:
      os.kill(os.getpid(), signal.SIGKILL)


make_callbacks = common.make_callbacks
common.make_callbacks = lambda *args: make_callbacks(*args) + [Kill()]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], "exec"), {{"__name__": "__main__"}})
"""


def run(args, check=True):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  process = subprocess.run([sys.executable] + args, capture_output=True, text=True,
                           env=env, timeout=300, check=False)
  if check:
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
  return process


def run_example(script, model_dir, *flags):
  process = run([os.path.join(EXAMPLES, script), f"--model_dir={model_dir}", *flags])
  with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f), process.stdout


def compiled_loss_name(model_path):
  """Class name of the loss a saved .keras model was compiled with."""
  with zipfile.ZipFile(model_path) as archive:
    config = json.loads(archive.read("config.json"))
  return config["compile_config"]["loss"]["class_name"]


def check_common_results(results, stdout, model_dir, steps=(2, 4)):
  assert results["train_steps"] == steps[-1]
  assert [row["step"] for row in results["history"]] == list(steps)
  assert 0. <= results["test_accuracy"] <= 1.
  assert f"clean test accuracy: {results['test_accuracy']:.4f}" in stdout
  assert os.listdir(os.path.join(model_dir, "tensorboard"))
  assert not os.path.exists(os.path.join(model_dir, "backup"))  # done: removed.


def test_mnist_margin_with_validation_noise_and_subset(tmp_path):
  results, stdout = run_example(
      "mnist.py", tmp_path, *FAST, "--num_validation=300", "--num_train_examples=200",
      "--noisy_label_fraction=0.4", "--gamma=0.5", "--dist_norm=2",
      "--margin_layers=input,conv1")
  check_common_results(results, stdout, tmp_path)
  assert results["flags"]["loss"] == "margin"
  assert results["flags"]["gamma"] == 0.5
  assert results["flags"]["margin_layers"] == ["input", "conv1"]
  assert results["num_replicas"] == 1
  history = results["history"]
  assert {"loss", "margin", "xent", "accuracy", "val_accuracy"} <= history[0].keys()
  best = max(history, key=lambda row: row["val_accuracy"])
  assert results["best_validation_accuracy"] == best["val_accuracy"]
  assert results["best_validation_step"] == best["step"]
  assert 0. <= results["best_validation_test_accuracy"] <= 1.
  assert os.path.exists(tmp_path / "best.weights.h5")
  model = keras.saving.load_model(tmp_path / "model.keras")
  assert model.margin_layers == ["input", "conv1"]
  assert model.loss.gamma == 0.5 and model.loss.dist_norm == 2
  assert int(model.optimizer.iterations) == 4


@pytest.mark.parametrize("loss", ["xent", "hinge"])
def test_mnist_baselines(tmp_path, loss):
  results, stdout = run_example("mnist.py", tmp_path, *FAST, f"--loss={loss}",
                                "--xent_weight=0.1")
  check_common_results(results, stdout, tmp_path)
  assert results["history"][0]["loss"] > 0
  expected = {"xent": "SparseCategoricalCrossentropy",
              "hinge": "HingeWithCrossEntropy"}[loss]
  assert compiled_loss_name(tmp_path / "model.keras") == expected


def test_mnist_original_config_and_overrides(tmp_path):
  results, stdout = run_example("mnist.py", tmp_path, "--config=original",
                                "--epochs=0", "--gamma=3", *FAST)
  check_common_results(results, stdout, tmp_path)
  flags = results["flags"]
  assert flags["gamma"] == 3.  # the command line wins over the config
  assert (flags["optimizer"], flags["learning_rate"], flags["optimizer_epsilon"],
          flags["weight_decay"], flags["layers_weights"], flags["clip_norm"],
          flags["margin_epsilon"], flags["alpha_factor"]) == (
              "rmsprop_tf1", 0.1, 1e-2, 5e-4, "size", 5., 1e-6, 4.)
  model = keras.saving.load_model(tmp_path / "model.keras")
  assert type(model.optimizer).__name__ == "RMSpropTF1"
  assert model.layers_weights == "size"


def test_mnist_mirrored_on_two_logical_cpus(tmp_path):
  results, stdout = run_example("mnist.py", tmp_path, *FAST, "--strategy=mirrored",
                                "--num_logical_cpus=2")
  check_common_results(results, stdout, tmp_path)
  assert results["num_replicas"] == 2


def test_killed_run_resumes_where_it_stopped(tmp_path):
  flags = [os.path.join(EXAMPLES, "mnist.py"), f"--model_dir={tmp_path}",
           "--train_steps=8", "--steps_per_loop=2", "--batch_size=16", "--verbose=2"]
  killed = run(["-c", KILLER.format(examples=EXAMPLES), "2"] + flags, check=False)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert "Epoch 2/4" in killed.stdout and "Epoch 3/4" not in killed.stdout
  assert not os.path.exists(tmp_path / "results.json")
  resumed = run(flags)
  assert "Epoch 3/4" in resumed.stdout and "Epoch 1/4" not in resumed.stdout
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert [row["step"] for row in results["history"]] == [2, 4, 6, 8]
  # The optimizer state came back too: 4 steps before the kill + 4 after.
  model = keras.saving.load_model(tmp_path / "model.keras")
  assert int(model.optimizer.iterations) == 8


def write_cifar10_binary(directory, records_per_file=16):
  """Made-up CIFAR-10 binary batches: 5 training files and the test file."""
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    labels = np.arange(records_per_file, dtype=np.uint8) % 10
    images = rng.integers(0, 256, size=(records_per_file, 3072), dtype=np.uint8)
    (directory / name).write_bytes(np.concatenate([labels[:, None], images], 1).tobytes())


def test_cifar10_small_resnet(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  write_cifar10_binary(data)
  model_dir = tmp_path / "model"
  results, stdout = run_example(
      "cifar10.py", model_dir, f"--data_source={data}", "--depth=8", "--width=4",
      "--num_margin_layers=3", "--num_validation=16", *FAST)
  check_common_results(results, stdout, model_dir)
  assert results["num_train_examples"] == 5 * 16 - 16
  flags = results["flags"]
  assert flags["margin_layers"] == ["input", "block1", "block2"]
  assert (flags["dist_norm"], flags["optimizer"], flags["lr_schedule"]) == (
      "2", "momentum", "piecewise")
  assert "val_accuracy" in results["history"][-1]


def test_imagenet_on_made_up_images(tmp_path):
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    for label in ("cat", "dog"):
      folder = tmp_path / "data" / split / label
      folder.mkdir(parents=True)
      for i in range(4):
        keras.utils.save_img(folder / f"{i}.png",
                             rng.integers(0, 256, size=(40, 50, 3)).astype("uint8"))
  model_dir = tmp_path / "model"
  results, stdout = run_example(
      "imagenet.py", model_dir, f"--data_source={tmp_path / 'data'}",
      "--image_size=75", "--train_steps=2", "--steps_per_loop=1", "--batch_size=4",
      "--margin_layers=input,mixed0", "--verbose=2")
  check_common_results(results, stdout, model_dir, steps=(1, 2))
  assert results["num_train_examples"] == 8
  assert (results["flags"]["dist_norm"], results["flags"]["top_k"]) == ("1", 1)
  with zipfile.ZipFile(model_dir / "model.keras") as archive:
    config = json.loads(archive.read("config.json"))
  assert config["config"]["layers"][-1]["config"]["units"] == 2  # two classes


def test_imagenet_needs_a_data_source(tmp_path):
  process = run([os.path.join(EXAMPLES, "imagenet.py"), f"--model_dir={tmp_path}",
                 f"--data_source={tmp_path / 'missing'}"], check=False)
  assert process.returncode != 0
  assert "must be 'tfds' or a directory" in process.stderr
