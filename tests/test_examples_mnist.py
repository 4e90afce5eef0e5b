"""examples/mnist.py end to end, a few steps each, in fresh processes."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

# Register the classes saved models refer to.
import tf_large_margin as tlm
from tf_large_margin import datasets

from example_runs import FAST
from example_runs import check_common_results
from example_runs import compiled_loss_name
from example_runs import run
from example_runs import run_example
from example_runs import script


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


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
  assert results["flags"]["dist_norm"] == results["config"]["dist_norm"] == "2"
  assert results["config"]["num_validation"] == 300
  assert results["num_replicas"] == 1 and results["resumed_at_step"] == 0
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
  assert {"loss", "margin", "accuracy", "val_accuracy"} <= history[0].keys()
  best = max(history, key=lambda row: row["val_accuracy"])
  assert results["best_validation_accuracy"] == best["val_accuracy"]
  assert results["best_validation_step"] == best["step"]
  assert 0.0 <= results["best_validation_test_accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "best.weights.h5")
  model = keras.saving.load_model(tmp_path / "model.keras")
  assert model.margin_layers == ["input", "conv1"]
  assert model.margin.gamma == 0.5 and model.margin.dist_norm == 2
  assert compiled_loss_name(tmp_path / "model.keras") is None  # the margin alone
  assert int(model.optimizer.iterations) == 4


@pytest.mark.parametrize(
    "loss,expected",
    [
        ("margin", "SparseCategoricalCrossentropy"),  # the --xent_weight term
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
  assert compiled_loss_name(tmp_path / "model.keras") == expected
  model = keras.saving.load_model(tmp_path / "model.keras")
  assert (getattr(model, "margin", None) is not None) == (loss == "margin")
  if loss != "margin":
    assert results["history"][0]["loss"] > 0
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
  assert (model.margin.gamma, model.margin.alpha_factor) == (3.0, 4.0)


def test_mnist_conflicting_epochs_and_train_steps_is_an_error(tmp_path):
  process = run(
      [
          script("mnist.py"),
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
              script("mnist.py"),
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


def test_mnist_progress_lines_count_loops_or_epochs(tmp_path):
  """With --train_steps a Keras epoch is a loop of --steps_per_loop steps, not a
  pass over the data: the progress lines say "Loop"; with --epochs, "Epoch"."""
  _, stdout = run_example("mnist.py", tmp_path / "steps", *FAST, "--loss=xent")
  assert "Loop 1/2 (steps 1-2 of 4; 0.0032 passes over the training set" in stdout
  assert "Loop 2/2 (steps 3-4 of 4;" in stdout and "Epoch" not in stdout
  results, stdout = run_example(
      "mnist.py",
      tmp_path / "epochs",
      "--epochs=2",
      "--num_train_examples=40",
      "--batch_size=16",
      "--verbose=2",
      "--loss=xent",
  )
  assert "Epoch 1/2" in stdout and "Epoch 2/2" in stdout and "Loop" not in stdout
  assert [row["step"] for row in results["history"]] == [2, 4]


def test_mnist_names_a_bad_label_where_the_data_enter(tmp_path):
  """A label outside [0, 10) in the data files stops the run before training,
  naming the file, the label and its index."""
  rng = np.random.default_rng(0)
  labels = {
      "train": np.array([1, 2, 3, 12, 4, 5, 6, 7, 8, 9] * 2),
      "t10k": np.arange(10),
  }
  for prefix, y in labels.items():
    images = rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8)
    datasets.write_idx_images(str(tmp_path / f"{prefix}-images-idx3-ubyte"), images)
    datasets.write_idx_labels(str(tmp_path / f"{prefix}-labels-idx1-ubyte"), y)
  command = [script("mnist.py"), f"--model_dir={tmp_path / 'run'}"]
  process = run(command + [f"--data_source={tmp_path}"], check=False)
  assert process.returncode != 0
  assert (
      "train-labels-idx1-ubyte: label 12 at index 3 is outside 0..9 (2 bad labels)"
      in process.stderr
  )
