"""The other example scripts end to end (cifar10.py, imagenet.py,
compare_methods.py, reproduce_mnist.py), in fresh processes, and
reproduce_mnist.py's tables with a stand-in for its runs."""

import json
import os
import zipfile

import keras
import numpy as np
import pytest

from example_runs import EXAMPLES
from example_runs import FAST
from example_runs import check_common_results
from example_runs import run
from example_runs import run_example
from example_runs import script


def test_compare_methods_with_lsoftmax_and_sphereface(tmp_path):
  process = run(
      [
          script("compare_methods.py"),
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
  # Each run is the runner's: its own model directory and results.
  with open(tmp_path / "runs" / "200_sphereface" / "results.json") as f:
    run_config = json.load(f)["config"]
  assert (run_config["loss"], run_config["multiplicative_margin"]) == ("sphereface", 4)
  assert (run_config["optimizer"], run_config["train_steps"]) == ("adam", 6)


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
  flags = results["config"]
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
          script("imagenet.py"),
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
          script("reproduce_mnist.py"),
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
