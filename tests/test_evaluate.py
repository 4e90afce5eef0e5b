"""examples/evaluate.py on tiny models: eval.json agrees with the library; PNGs."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_large_margin as tlm
from tf_large_margin import attacks
from tf_large_margin import certified
from tf_large_margin import datasets
from tf_large_margin import directional_margins
from tf_large_margin import margin_estimation

import matplotlib  # noqa: F401  (the plots need it: a missing install fails here)

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "evaluate.py")
NUM_EXAMPLES, BATCH_SIZE = 60, 25
EPSILONS, SIGMAS = [0.0, 0.1], [0.3]


def tiny_model(path, seed, margin=None):
  keras.utils.set_random_seed(seed)
  x, y, _, _ = datasets.load_dataset("mnist")
  inputs = keras.Input((28, 28, 1))
  h = keras.layers.Dense(16, activation="relu", name="fc0")(
      keras.layers.Flatten()(inputs)
  )
  model = tlm.MarginModel(
      inputs, keras.layers.Dense(10)(h), margin=margin, margin_layers=["input"]
  )
  model.compile(
      keras.optimizers.Adam(3e-3),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  model.fit(x[:1000] / 255.0, y[:1000], batch_size=50, epochs=1, verbose=0)
  model.save(path)
  return model


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
  directory = tmp_path_factory.mktemp("evaluate")
  source = tiny_model(str(directory / "xent.keras"), 0)
  target = tiny_model(
      str(directory / "margin.keras"), 1, margin=tlm.LayerMargin(gamma=1.0)
  )
  output = directory / "out"
  run = subprocess.run(
      [
          sys.executable,
          SCRIPT,
          f"--model={directory / 'xent.keras'},{directory / 'margin.keras'}",
          f"--source_model={directory / 'xent.keras'}",
          "--data_source=embedded",
          f"--num_examples={NUM_EXAMPLES}",
          f"--batch_size={BATCH_SIZE}",
          "--epsilons=0,0.1",
          "--sigmas=0.3",
          "--ifgsm_steps=3",
          "--margin_layers=input,fc0",
          "--deepfool_steps=10",
          "--thresholds=0.5",
          "--seed=4",
          f"--output_dir={output}",
      ],
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  with open(output / "eval.json", encoding="utf-8") as f:
    report = json.load(f)
  _, _, x_test, y_test = datasets.load_dataset("mnist")
  dataset = datasets.make_tf_dataset(
      x_test[:NUM_EXAMPLES], y_test[:NUM_EXAMPLES], BATCH_SIZE, training=False
  )
  return report, run.stdout, output, source, target, dataset


def test_report_keys(evaluation):
  report, _, _, _, _, _ = evaluation
  assert report["num_examples"] == NUM_EXAMPLES
  assert sorted(report["models"]) == ["margin", "xent"]
  margin_result = report["models"]["margin"]
  assert sorted(margin_result) == [
      "black_box",
      "black_box_by_loss",
      "certified",
      "clean_accuracy",
      "gaussian",
      "margins",
      "path",
      "transfer",
      "white_box",
      "white_box_by_loss",
      "zero_gradient_fraction",
  ]
  assert "black_box" not in report["models"]["xent"]  # the source itself
  assert sorted(margin_result["zero_gradient_fraction"]) == ["logit_margin", "xent"]
  for curves in (
      margin_result["white_box"],
      margin_result["black_box"],
      *margin_result["white_box_by_loss"].values(),
      *margin_result["black_box_by_loss"].values(),
  ):
    assert sorted(curves) == ["fgsm", "iterative_fgsm"]
    assert sorted(curves["fgsm"]) == ["0.0", "0.1"]
  assert sorted(margin_result["certified"]) == ["0.0", "0.1"]
  assert sorted(margin_result["gaussian"]) == ["0.3"]
  assert sorted(margin_result["margins"]) == ["deepfool", "fc0", "input", "linearized"]
  assert sorted(margin_result["margins"]["input"]["fraction_below"]) == ["0.5"]


def test_report_values_equal_the_library(evaluation):
  report, _, _, source, target, dataset = evaluation
  result = report["models"]["margin"]
  clean = attacks.robust_accuracy(target, dataset)
  assert result["clean_accuracy"] == pytest.approx(clean)
  assert result["white_box"]["fgsm"]["0.0"] == pytest.approx(clean)
  by_loss = {
      loss: attacks.robust_accuracy(target, dataset, "fgsm", epsilon=0.1, loss=loss)
      for loss in ("xent", "logit_margin")
  }
  for loss, accuracy in by_loss.items():
    assert result["white_box_by_loss"][loss]["fgsm"]["0.1"] == pytest.approx(accuracy)
  # The reported number is the worst case over the objectives.
  assert result["white_box"]["fgsm"]["0.1"] == pytest.approx(min(by_loss.values()))
  assert result["white_box_by_loss"]["xent"]["iterative_fgsm"]["0.1"] == pytest.approx(
      attacks.robust_accuracy(target, dataset, "iterative_fgsm", epsilon=0.1, steps=3)
  )
  assert result["black_box_by_loss"]["xent"]["fgsm"]["0.1"] == pytest.approx(
      attacks.robust_accuracy(target, dataset, "fgsm", source_model=source, epsilon=0.1)
  )
  radii = np.concatenate(
      [certified.certified_radius(target, x, y, max_radius=0.1, clip_min=0.0, clip_max=1.0)
       for x, y in dataset]
  )
  for epsilon in ("0.0", "0.1"):
    certified_accuracy = np.mean((radii >= float(epsilon)) & (radii > 0))
    assert result["certified"][epsilon] == pytest.approx(certified_accuracy)
    # A floor under every attack.
    assert result["certified"][epsilon] <= result["white_box"]["fgsm"][epsilon]
    assert (
        result["certified"][epsilon] <= result["white_box"]["iterative_fgsm"][epsilon]
    )
  assert result["certified"]["0.0"] > 0.5 * clean
  for loss in ("xent", "logit_margin"):
    zero = [
        attacks.zero_gradient_fraction(target, x, y, loss=loss) * len(y)
        for x, y in dataset
    ]
    assert result["zero_gradient_fraction"][loss] == pytest.approx(
        sum(zero) / NUM_EXAMPLES
    )
  assert result["gaussian"]["0.3"] == pytest.approx(
      attacks.robust_accuracy(target, dataset, "gaussian", sigma=0.3, seed=4)
  )
  assert result["white_box"]["fgsm"]["0.1"] < clean  # the attack did something
  values = margin_estimation.dataset_margins(
      target, dataset, ["input", "fc0"], dist_norm=2, deepfool_steps=10
  )
  summary = margin_estimation.summarize_margins(values, thresholds=[0.5])
  for name in ("input", "fc0", "linearized", "deepfool"):
    assert result["margins"][name]["count"] == round(clean * NUM_EXAMPLES)
    assert result["margins"][name]["median"] == pytest.approx(
        summary[name]["median"], rel=1e-5
    )
    assert result["margins"][name]["fraction_below"]["0.5"] == pytest.approx(
        summary[name]["fraction_below"]["0.5"]
    )
  assert report["models"]["xent"]["clean_accuracy"] == pytest.approx(
      attacks.robust_accuracy(source, dataset)
  )


def test_transfer_analysis_equals_the_library(evaluation):
  report, _, _, source, target, dataset = evaluation
  transfer = report["models"]["margin"]["transfer"]
  assert sorted(transfer) == ["logit_margin", "xent"]
  assert "transfer" not in report["models"]["xent"]
  for loss in ("xent", "logit_margin"):
    alignment, radii = [], []
    for x, y in dataset:
      _, gradient = attacks.loss_gradient(source, x, y, loss)
      alignment.append(
          directional_margins.direction_alignment(target, x, y, np.sign(gradient))
      )
      radii.append(
          directional_margins.directional_margins(target, x, y, np.sign(gradient), 0.1, 60)
      )
    alignment, radii = np.concatenate(alignment), np.concatenate(radii)
    correct = radii > 0
    assert transfer[loss]["alignment"]["count"] == correct.sum()
    assert transfer[loss]["alignment"]["median"] == pytest.approx(
        np.median(alignment[correct]), rel=1e-5
    )
    assert transfer[loss]["directional_margin"]["median"] == pytest.approx(
        np.median(radii[correct]), rel=1e-5
    )
    assert 0 < np.median(alignment[correct]) < 1
    # Examples never flipped along the line up to 0.1 survive black-box FGSM at 0.1.
    black_box = report["models"]["margin"]["black_box_by_loss"][loss]["fgsm"]["0.1"]
    assert black_box >= np.mean(np.isinf(radii)) - 1e-9


def test_plots_and_progress(evaluation):
  _, stdout, output, _, _, _ = evaluation
  for name in (
      "accuracy_vs_epsilon",
      "gaussian_noise",
      "margins_xent",
      "margins_margin",
  ):
    with open(output / f"{name}.png", "rb") as f:
      content = f.read()
    assert content.startswith(b"\x89PNG") and len(content) > 10_000, name
  assert "clean accuracy" in stdout and "margins: batch 3/3" in stdout


def test_missing_model_file(tmp_path):
  run = subprocess.run(
      [
          sys.executable,
          SCRIPT,
          f"--model={tmp_path / 'none.keras'}",
          f"--output_dir={tmp_path}",
      ],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert run.returncode != 0 and "No model file" in run.stderr


def test_model_with_cos_scale_head(tmp_path):
  """A saved L-Softmax model (output [cos, scale], 2C columns) is evaluated on its
  logits cos * scale: accuracy, attacks and margins equal the library's on
  `layers.logits_model` of the model."""
  keras.utils.set_random_seed(0)
  x, y, x_test, y_test = datasets.load_dataset("mnist")
  # m = 1 (plain softmax on the head's logits), so that the model learns: with
  # m = 2 and no annealing this network's features collapse to zero (README).
  loss = tlm.LSoftmax(m=1)
  inputs = keras.Input((28, 28, 1))
  h = keras.layers.Dense(16, activation="relu", name="fc0")(
      keras.layers.Flatten()(inputs)
  )
  model = tlm.MarginModel(
      inputs, tlm.CosineHead(10, **loss.head_config)(h), margin_layers=["input"]
  )
  model.compile(
      keras.optimizers.Adam(1e-3),
      loss=loss,
      metrics=[tlm.layers.accuracy_metric(model)],
  )
  model.fit(x[:1000] / 255.0, y[:1000], batch_size=50, epochs=1, verbose=0)
  model.save(tmp_path / "lsoftmax.keras")
  output = tmp_path / "out"
  run = subprocess.run(
      [
          sys.executable,
          SCRIPT,
          f"--model={tmp_path / 'lsoftmax.keras'}",
          "--data_source=embedded",
          f"--num_examples={NUM_EXAMPLES}",
          f"--batch_size={BATCH_SIZE}",
          "--epsilons=0.1",
          "--sigmas=0",
          "--ifgsm_steps=2",
          "--deepfool_steps=10",
          f"--output_dir={output}",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  with open(output / "eval.json", encoding="utf-8") as f:
    result = json.load(f)["models"]["lsoftmax"]
  x_eval = x_test[:NUM_EXAMPLES] / 255.0
  logits = tlm.layers.head_output_logits(model.predict(x_eval, verbose=0))
  clean = np.mean(np.argmax(logits, axis=1) == y_test[:NUM_EXAMPLES])
  assert 0.3 < clean < 1.0
  assert result["clean_accuracy"] == pytest.approx(clean)
  logits_model = tlm.layers.logits_model(model)
  dataset = datasets.make_tf_dataset(
      x_test[:NUM_EXAMPLES], y_test[:NUM_EXAMPLES], BATCH_SIZE, training=False
  )
  assert result["white_box_by_loss"]["xent"]["fgsm"]["0.1"] == pytest.approx(
      attacks.robust_accuracy(logits_model, dataset, "fgsm", epsilon=0.1)
  )
  # The bounds do not support the cosine head: reported, not fatal.
  assert "CosineHead" in result["certified_unavailable"]
  summary = margin_estimation.summarize_margins(
      margin_estimation.dataset_margins(
          logits_model, dataset, ["input"], deepfool_steps=10
      )
  )
  for name in ("input", "deepfool"):
    assert np.isfinite(result["margins"][name]["median"])
    assert result["margins"][name]["median"] == pytest.approx(
        summary[name]["median"], rel=1e-5
    )
