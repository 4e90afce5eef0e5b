"""The example scripts end to end, a few steps each, in fresh processes.

Fresh processes because absl flags are global and logical devices must be
configured before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

# Register the classes saved models refer to.
import tf_large_margin as tlm
import tf_large_margin.optimizers  # pylint: disable=unused-import
from tf_large_margin import datasets

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
)
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
  process = subprocess.run(
      [sys.executable] + args,
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      check=False,
  )
  if check:
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
  return process


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


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
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert f"clean test accuracy: {results['test_accuracy']:.4f}" in stdout
  assert os.listdir(os.path.join(model_dir, "tensorboard"))
  assert not os.path.exists(os.path.join(model_dir, "backup"))  # done: removed.


def test_mnist_margin_with_validation_noise_and_subset(tmp_path):
  results, stdout = run_example(
      "mnist.py",
      tmp_path,
      *FAST,
      "--num_validation=300",
      "--num_train_examples=200",
      "--noisy_label_fraction=0.4",
      "--gamma=0.5",
      "--dist_norm=2",
      "--margin_layers=input,conv1",
  )
  check_common_results(results, stdout, tmp_path)
  assert results["flags"]["loss"] == "margin"
  assert results["flags"]["gamma"] == 0.5
  assert results["flags"]["margin_layers"] == ["input", "conv1"]
  assert results["num_replicas"] == 1
  # The default configuration: the original one with learning rate 0.01.
  flags = results["flags"]
  assert (
      flags["optimizer"],
      flags["learning_rate"],
      flags["weight_decay"],
      flags["layers_weights"],
      flags["xent_weight"],
      flags["clip_norm"],
  ) == ("rmsprop_tf1", 0.01, 5e-4, "size", 0.0, 5.0)
  history = results["history"]
  assert {"loss", "margin", "xent", "accuracy", "val_accuracy"} <= history[0].keys()
  best = max(history, key=lambda row: row["val_accuracy"])
  assert results["best_validation_accuracy"] == best["val_accuracy"]
  assert results["best_validation_step"] == best["step"]
  assert 0.0 <= results["best_validation_test_accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "best.weights.h5")
  model = keras.saving.load_model(tmp_path / "model.keras")
  assert model.margin_layers == ["input", "conv1"]
  assert model.loss.gamma == 0.5 and model.loss.dist_norm == 2
  assert int(model.optimizer.iterations) == 4


@pytest.mark.parametrize(
    "loss,expected",
    [
        ("xent", "SparseCategoricalCrossentropy"),
        ("hinge", "MulticlassHinge"),
        ("jacobian", "MulticlassHinge"),
        ("amsoftmax", "AMSoftmax"),
        ("arcface", "ArcFace"),
        ("lsoftmax", "LSoftmax"),
        ("sphereface", "SphereFace"),
    ],
)
def test_mnist_other_losses(tmp_path, loss, expected):
  results, stdout = run_example(
      "mnist.py", tmp_path, *FAST, f"--loss={loss}", "--xent_weight=0.1"
  )
  check_common_results(results, stdout, tmp_path)
  assert results["history"][0]["loss"] > 0
  assert compiled_loss_name(tmp_path / "model.keras") == expected
  model = keras.saving.load_model(tmp_path / "model.keras")
  if loss == "jacobian":
    assert isinstance(model, tlm.JacobianModel) and model.feature_layer == "fc0"
  if loss in ("amsoftmax", "arcface", "lsoftmax", "sphereface"):
    head = model.layers[-1]
    assert isinstance(head, tlm.CosineHead)
    config = head.get_config()
    assert {k: config[k] for k in type(model.loss).head_config} == (
        type(model.loss).head_config
    )
    assert tlm.layers.returns_head_output(model) == (loss in ("lsoftmax", "sphereface"))


def test_mnist_test_accuracy_of_lsoftmax_and_sphereface_heads(tmp_path):
  """The logged and test accuracies of a [cos, scale] head are those of the logits
  cos * scale (not of the argmax over the 2C columns), and --multiplicative_margin
  and the --lambda_* annealing flags reach the loss."""
  for loss, m in (("lsoftmax", 2), ("sphereface", 3)):
    model_dir = tmp_path / loss
    results, stdout = run_example(
        "mnist.py",
        model_dir,
        "--train_steps=6",
        "--steps_per_loop=3",
        "--batch_size=32",
        "--verbose=2",
        f"--loss={loss}",
        *(
            [f"--multiplicative_margin={m}", "--lambda_gamma=0.5", "--lambda_min=0"]
            if loss == "sphereface"
            else []
        ),
    )
    check_common_results(results, stdout, model_dir, steps=(3, 6))
    model = keras.saving.load_model(model_dir / "model.keras")
    assert model.loss.m == m
    # Annealed (LambdaDecay from the flags, SphereFace's by default), advanced
    # during training: the history has the lambda of each loop's last step.
    base, gamma, power, lambda_min = (
        (1000.0, 0.12, 1.0, 5.0) if loss == "lsoftmax" else (1000.0, 0.5, 1.0, 0.0)
    )
    assert model.loss.lambda_.get_config() == dict(
        base=base, gamma=gamma, power=power, lambda_min=lambda_min
    )
    assert (results["flags"]["lambda_gamma"], results["flags"]["lambda_min"]) == (
        gamma,
        lambda_min,
    )
    np.testing.assert_allclose(
        [row["lambda"] for row in results["history"]],
        [max(lambda_min, base / (1 + gamma * step) ** power) for step in (2, 5)],
        rtol=1e-5,
    )
    _, _, x_test, y_test = datasets.load_dataset("mnist")
    test = datasets.make_tf_dataset(x_test, y_test, 500, training=False)
    output = model.predict(test, verbose=0)
    assert output.shape == (len(y_test), 20)
    logits = tlm.layers.head_output_logits(output).numpy()
    accuracy = np.mean(np.argmax(logits, axis=1) == y_test)
    assert results["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    # Keras' "accuracy" on [cos, scale] would be another number (about 0: the
    # scale columns, not classes, are usually the largest).
    assert np.mean(np.argmax(output, axis=1) == y_test) != pytest.approx(accuracy)
    np.testing.assert_allclose(
        tlm.layers.logits_model(model).predict(test, verbose=0), logits, rtol=1e-6
    )


def test_compare_methods_with_lsoftmax_and_sphereface(tmp_path):
  process = run(
      [
          os.path.join(EXAMPLES, "compare_methods.py"),
          f"--out_dir={tmp_path}",
          "--train_sizes=200",
          "--methods=weight_decay,lsoftmax,sphereface",
          "--train_steps=6",
          "--batch_size=32",
          "--num_test=200",
          "--num_margin=20",
      ]
  )
  with open(tmp_path / "comparison.json", encoding="utf-8") as f:
    rows = json.load(f)["rows"]
  assert [row["method"] for row in rows] == ["weight_decay", "lsoftmax", "sphereface"]
  with open(tmp_path / "comparison.json", encoding="utf-8") as f:
    recorded = json.load(f)["flags"]
  assert (
      recorded["lambda_base"],
      recorded["lambda_gamma"],
      recorded["lambda_power"],
      recorded["lambda_min"],
  ) == (1000.0, 0.12, 1.0, 5.0)
  for row in rows:
    assert 0.0 <= row["accuracy"] <= 1.0
    assert {"first_order_l2", "deepfool_l2", "train_seconds"} <= row.keys()
  assert rows[0]["accuracy"] > 0.2 and 0 < rows[0]["deepfool_l2"] < np.inf
  assert "| 200 | sphereface |" in process.stdout


def test_mnist_original_config_and_overrides(tmp_path):
  """--train_steps typed on the command line wins over the config's epochs=200."""
  results, stdout = run_example(
      "mnist.py", tmp_path, "--config=original", "--gamma=3", *FAST
  )
  check_common_results(results, stdout, tmp_path)
  assert results["train_steps"] == 4
  flags = results["flags"]
  assert flags["gamma"] == 3.0  # the command line wins over the config
  assert (
      flags["optimizer"],
      flags["learning_rate"],
      flags["optimizer_epsilon"],
      flags["weight_decay"],
      flags["layers_weights"],
      flags["clip_norm"],
      flags["margin_epsilon"],
      flags["alpha_factor"],
  ) == ("rmsprop_tf1", 0.1, 1e-2, 5e-4, "size", 5.0, 1e-6, 4.0)
  model = keras.saving.load_model(tmp_path / "model.keras")
  assert type(model.optimizer).__name__ == "RMSpropTF1"
  assert model.layers_weights == "size"


def test_mnist_conflicting_epochs_and_train_steps_is_an_error(tmp_path):
  process = run(
      [
          os.path.join(EXAMPLES, "mnist.py"),
          f"--model_dir={tmp_path}",
          "--epochs=2",
          *FAST,
      ],
      check=False,
  )
  assert process.returncode != 0
  assert "--epochs=2 and --train_steps=4 conflict" in process.stderr


def test_mnist_mirrored_on_two_logical_cpus(tmp_path):
  results, stdout = run_example(
      "mnist.py", tmp_path, *FAST, "--strategy=mirrored", "--num_logical_cpus=2"
  )
  check_common_results(results, stdout, tmp_path)
  assert results["num_replicas"] == 2


def test_mnist_multi_worker_two_processes(tmp_path):
  """Two local workers; the chief (worker 0) writes the results, worker 1 its own
  scratch directory."""
  cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
  workers = [
      subprocess.Popen(
          [
              sys.executable,
              os.path.join(EXAMPLES, "mnist.py"),
              f"--model_dir={tmp_path}",
              "--strategy=multi_worker",
              *FAST,
          ],
          env=dict(
              os.environ,
              TF_CPP_MIN_LOG_LEVEL="2",
              TF_CONFIG=json.dumps(
                  {"cluster": cluster, "task": {"type": "worker", "index": i}}
              ),
          ),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [worker.communicate(timeout=300)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  check_common_results(results, outputs[0], tmp_path)
  assert results["num_replicas"] == 2
  scratch = tmp_path / "workers" / "worker_1"
  assert (scratch / "model.keras").exists() and not (scratch / "results.json").exists()


def test_killed_run_resumes_where_it_stopped(tmp_path):
  flags = [
      os.path.join(EXAMPLES, "mnist.py"),
      f"--model_dir={tmp_path}",
      "--train_steps=8",
      "--steps_per_loop=2",
      "--batch_size=16",
      "--verbose=2",
  ]
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
    (directory / name).write_bytes(
        np.concatenate([labels[:, None], images], 1).tobytes()
    )


def test_cifar10_small_resnet(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  write_cifar10_binary(data)
  model_dir = tmp_path / "model"
  results, stdout = run_example(
      "cifar10.py",
      model_dir,
      f"--data_source={data}",
      "--depth=8",
      "--width=4",
      "--num_margin_layers=3",
      "--num_validation=16",
      *FAST,
  )
  check_common_results(results, stdout, model_dir)
  assert results["num_train_examples"] == 5 * 16 - 16
  flags = results["flags"]
  assert flags["margin_layers"] == ["input", "block1", "block2"]
  assert (flags["dist_norm"], flags["optimizer"], flags["lr_schedule"]) == (
      "2",
      "momentum",
      "piecewise",
  )
  assert "val_accuracy" in results["history"][-1]


def test_imagenet_on_made_up_images(tmp_path):
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    for label in ("cat", "dog"):
      folder = tmp_path / "data" / split / label
      folder.mkdir(parents=True)
      for i in range(4):
        keras.utils.save_img(
            folder / f"{i}.png", rng.integers(0, 256, size=(40, 50, 3)).astype("uint8")
        )
  model_dir = tmp_path / "model"
  results, stdout = run_example(
      "imagenet.py",
      model_dir,
      f"--data_source={tmp_path / 'data'}",
      "--image_size=75",
      "--train_steps=2",
      "--steps_per_loop=1",
      "--batch_size=4",
      "--margin_layers=input,mixed0",
      "--verbose=2",
  )
  check_common_results(results, stdout, model_dir, steps=(1, 2))
  assert results["num_train_examples"] == 8
  assert (results["flags"]["dist_norm"], results["flags"]["top_k"]) == ("1", 1)
  with zipfile.ZipFile(model_dir / "model.keras") as archive:
    config = json.loads(archive.read("config.json"))
  assert config["config"]["layers"][-1]["config"]["units"] == 2  # two classes


def test_imagenet_needs_a_data_source(tmp_path):
  process = run(
      [
          os.path.join(EXAMPLES, "imagenet.py"),
          f"--model_dir={tmp_path}",
          f"--data_source={tmp_path / 'missing'}",
      ],
      check=False,
  )
  assert process.returncode != 0
  assert "must be 'tfds' or a directory" in process.stderr


@pytest.fixture
def reproduce_mnist(monkeypatch):
  """examples/reproduce_mnist.py imported, its flags parsed anew per test."""
  monkeypatch.syspath_prepend(EXAMPLES)
  import reproduce_mnist as module  # pylint: disable=import-outside-toplevel

  yield module
  module.FLAGS.unparse_flags()


def fake_run(calls):
  """A stand-in for reproduce_mnist.run: results from the flags, no training."""

  def run_(name, steps, *run_flags):
    values = dict(f.lstrip("-").split("=", 1) for f in run_flags)
    calls.append((name, steps, values))
    gamma = float(values.get("gamma", 0))
    size = int(values.get("num_train_examples", 1000))
    noise = float(values["noisy_label_fraction"])
    accuracy = (0.5 if values["loss"] == "xent" else 0.6) - noise / 2 + size / 1e5
    return {
        "best_validation_accuracy": -abs(gamma - 2.0),
        "num_train_examples": size,
        "best_validation_test_accuracy": accuracy,
    }

  return run_


def test_reproduce_mnist_tables_and_selection(reproduce_mnist, monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(reproduce_mnist, "run", fake_run(calls))
  reproduce_mnist.FLAGS(
      [
          "reproduce_mnist.py",
          f"--out_dir={tmp_path}",
          "--norms=2",
          "--search_grid=2:0.5,2/1,8",
          "--noise_fractions=0,0.8",
          "--train_sizes=68",
          "--size_norm=2",
      ]
  )
  reproduce_mnist.main(None)
  searched = [
      (v["gamma"], v["alpha_factor"]) for n, _, v in calls if n.startswith("search_")
  ]
  assert searched == [("0.5", "4.0"), ("2.0", "1.0"), ("8.0", "4.0")]
  margin_runs = [
      v for n, _, v in calls if not n.startswith("search_") and v["loss"] == "margin"
  ]
  assert {(v["gamma"], v["alpha_factor"]) for v in margin_runs} == {("2.0", "1.0")}
  report = (tmp_path / "results.md").read_text()
  assert "l2: (2.0, 1.0)" in report
  assert "| 0% | 51.00 | 61.00 |" in report
  assert "| 80% | 11.00 | 21.00 |" in report
  assert "| 68 | 50.07 | 60.07 |" in report
  assert "| 1000 | 51.00 | 61.00 |" in report  # the full set: the 0 % noise runs
  assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_reproduce_mnist_end_to_end(tmp_path):
  """Three real mnist.py runs: the search point and xent / margin at 0 % noise (the
  full-size point of sweep (b) reuses them)."""
  process = run(
      [
          os.path.join(EXAMPLES, "reproduce_mnist.py"),
          f"--out_dir={tmp_path}",
          "--num_validation=300",
          "--train_steps=2",
          "--search_steps=2",
          "--steps_per_loop=1",
          "--batch_size=16",
          "--norms=inf",
          "--search_grid=inf:0.2",
          "--noise_fractions=0",
          "--train_sizes=",
          "--size_norm=inf",
      ]
  )
  assert len(os.listdir(tmp_path / "runs")) == 3
  for name in os.listdir(tmp_path / "runs"):
    with open(tmp_path / "runs" / name / "results.json", encoding="utf-8") as f:
      flags = json.load(f)["flags"]
    # The sweep's own settings, not mnist.py's (original-configuration) defaults.
    assert (
        flags["optimizer"],
        flags["optimizer_epsilon"],
        flags["weight_decay"],
        flags["layers_weights"],
    ) == ("adam", 1e-7, 0.0, "none")
  report = (tmp_path / "results.md").read_text()
  assert "| 0% |" in report and "| 9700 |" in report  # 10k sample - 300 validation
  assert report in process.stdout
