"""The other example scripts end to end (cifar10.py, imagenet.py,
compare_methods.py, reproduce_mnist.py), in fresh processes, and
reproduce_mnist.py's tables with a stand-in for its runs."""

import json
import math
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
  """examples/reproduce_mnist.py (and paper_report.py, which shares its flags)
  imported, the flags parsed anew per test."""
  monkeypatch.syspath_prepend(EXAMPLES)
  import paper_report  # pylint: disable=import-outside-toplevel
  import reproduce_mnist as module  # pylint: disable=import-outside-toplevel

  module.paper_report = paper_report
  yield module
  module.FLAGS.unparse_flags()


def fake_accuracy(values):
  """Test accuracy of a stand-in run: a function of method, seed and point."""
  bonus = {"xent": 0.0, "margin_all": 0.02, "margin_all_logits": 0.05}[values["method"]]
  return 0.5 + bonus + 0.01 * int(values["seed"]) * (1 + bonus) + int(values["size"]) / 1e4


def fake_mnist(calls):
  """A stand-in for the driver's mnist.py process: writes results.json from the
  flags (validation best at gamma 100), no training."""

  def run_(command, **unused_kwargs):
    values = dict(f.lstrip("-").split("=", 1) for f in command[2:])
    method = values["loss"] if values["loss"] == "xent" else (
        "margin_all_logits" if values.get("margin_score") == "logits" else "margin_all")
    values.update(method=method, size=values["num_train_examples"])
    calls.append(values)
    gamma = float(values.get("gamma", 100))
    results = dict(
        history=[{"margin_active/input": 0.25, "margin_distance_median/input": gamma}]
        if method != "xent" else [{"loss": 1.0}],
        num_train_examples=int(values["size"]),
        best_validation_accuracy=1.0 - abs(math.log10(gamma) - 2),
        best_validation_step=10,
        best_validation_test_accuracy=fake_accuracy(values),
        test_accuracy=0.0,
        train_seconds_this_run=1.0,
    )
    with open(os.path.join(values["model_dir"], "results.json"), "w") as f:
      json.dump(results, f)

  return run_


def test_reproduce_mnist_search_records_and_report(reproduce_mnist, monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(reproduce_mnist.subprocess, "run", fake_mnist(calls))
  reproduce_mnist.FLAGS(
      [
          "reproduce_mnist.py",
          f"--out_dir={tmp_path}",
          "--task=limited_data",
          "--points=68,550",
          "--methods=xent,margin_all,margin_all_logits",
          "--seeds=0,1,2",
          "--train_steps=40",
      ]
  )
  reproduce_mnist.main(None)
  # The search runs every gamma of the method's grid at seed 0; the other seeds
  # use the best on validation (100 for the logit grid; 1e3 or 1e4 tie: the first).
  margin_calls = [(c["method"], c["size"], c["seed"], float(c["gamma"]))
                  for c in calls if c["method"] != "xent"]
  logits_at_68 = sorted(g for m, n, s, g in margin_calls
                        if m == "margin_all_logits" and n == "68")
  assert logits_at_68 == [30.0, 100.0, 100.0, 100.0, 300.0]
  assert len(calls) == 2 * (3 + (3 + 2) + (3 + 2))
  assert {c["batch_size"] for c in calls if c["size"] == "68"} == {"68"}
  assert {c["optimizer"] for c in calls if c["method"] == "xent"} == {"momentum"}
  assert {c["optimizer"] for c in calls if c["method"] != "xent"} == {"rmsprop_tf1"}
  records = reproduce_mnist.read_cells(str(tmp_path))
  record = records["limited_data/margin_all_logits/68_gamma=100_seed=1"]
  assert record["epochs"] == 40 and record["fraction_of_paper_epochs"] == 0.2
  assert record["active_fraction_mean"] == {"input": 0.25}
  # Running again finds everything done.
  calls.clear()
  reproduce_mnist.main(None)
  assert not calls

  text = reproduce_mnist.paper_report.report(str(tmp_path), 0, ["xent"])
  expected = [100 * (fake_accuracy(dict(method="margin_all_logits", seed=s, size=68))
                     - fake_accuracy(dict(method="xent", seed=s, size=68))) for s in range(3)]
  mean, std = np.mean(expected), np.std(expected, ddof=1)
  half = 4.303 * std / math.sqrt(3)
  assert f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" in text
  accuracies = [100 * fake_accuracy(dict(method="xent", seed=s, size=550)) for s in range(3)]
  assert f"| 550 | {np.mean(accuracies):.2f} ± {np.std(accuracies, ddof=1):.2f} (3) |" in text
  # The claim at 68: +2.x points against the paper's 3.7 with a tight interval.
  claim_68 = [line for line in text.split("\n") if "by 3.7 points" in line]
  assert "| probabilities, k=1 (released config) | +2." in claim_68[0]
  assert claim_68[0].endswith("| partly (sign only) |")
  assert "| logits, k=1 | +5." in claim_68[1] and claim_68[1].endswith("| reproduced |")
  assert "80 % noisy labels" in text and "not run" in text
  assert (tmp_path / "limited_data.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "report.md").read_text() == text
  # --readme: the marked blocks take the same tables, the text around them stays.
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- paper_report:claims -->\nold\n<!-- /paper_report:claims -->\n"
                    "mid\n<!-- paper_report:limited_data -->\n<!-- /paper_report:limited_data -->\n")
  blocks = reproduce_mnist.paper_report.readme_blocks(
      *reproduce_mnist.paper_report.load(str(tmp_path), 0), ["xent"])
  assert reproduce_mnist.paper_report.update_readme(str(readme), blocks) == [
      "claims", "limited_data"]
  updated = readme.read_text()
  assert "old" not in updated and updated.startswith("intro\n") and "\nmid\n" in updated
  assert claim_68[0] in updated
  differences = updated.split("Paired difference margin − xent (points)")[1]
  assert "| 68 | " in differences and f"{mean:+.2f} [{mean - half:+.2f}" in differences
  readme.write_text("<!-- paper_report:figures -->\n\n<!-- /paper_report:figures -->\n")
  with pytest.raises(ValueError, match="no table 'figures'"):
    reproduce_mnist.paper_report.update_readme(str(readme), blocks)


def fake_evaluate(calls, train):
  """Stand-in for the processes of --task=robustness: mnist.py as `fake_mnist`,
  evaluate.py writes an eval.json whose accuracies depend on the model's method
  and seed (margin_all: +10 points under every attack but white-box iterative
  FGSM, where it is -15, -5, +5 points at seeds 0, 1, 2)."""

  def run_(command, **kwargs):
    if not command[1].endswith("evaluate.py"):
      return train(command, **kwargs)
    values = dict(f.lstrip("-").split("=", 1) for f in command[2:])
    calls.append(values)
    model = values["model"]
    seed = int(model.split("seed=")[1][0])
    bonus = 0.1 if "/margin_all/" in model else 0.0
    def curve(extra=0.0):
      return {e: 0.9 - float(e) + 0.01 * seed + extra for e in ("0.0", "0.1", "0.2")}
    fgsm_ifgsm = dict(fgsm=curve(bonus), iterative_fgsm=curve(bonus * (seed - 1.5)))
    summary = lambda value: dict(median=value)  # noqa: E731
    alignment = 0.3 + 0.1 * ("/margin_all/" in model) + 0.01 * seed
    result = dict(clean_accuracy=0.99, white_box=fgsm_ifgsm, black_box=fgsm_ifgsm,
                  certified=curve(), zero_gradient_fraction=dict(xent=0.0),
                  margins=dict(linearized=summary(0.06 + bonus / 5)),
                  transfer={loss: dict(alignment=summary(alignment),
                                       directional_margin=summary(0.2 - seed / 100))
                            for loss in ("xent", "logit_margin")})
    evaluation = dict(num_examples=int(values["num_examples"]), ifgsm_steps=10,
                      attack_losses=["xent", "logit_margin"], models={"m": result})
    with open(os.path.join(values["output_dir"], "eval.json"), "w") as f:
      json.dump(evaluation, f)

  return run_


def test_reproduce_mnist_robustness(reproduce_mnist, monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(reproduce_mnist.subprocess, "run",
                      fake_evaluate(calls, fake_mnist([])))
  flags = [f"--out_dir={tmp_path}", "--methods=xent,xent_rmsprop,margin_all", "--seeds=0,1,2",
           "--robustness_examples=100"]
  reproduce_mnist.FLAGS(["reproduce_mnist.py", "--task=robustness", *flags])
  with pytest.raises(ValueError, match="needs the trained noisy_labels cells of xent"):
    reproduce_mnist.main(None)
  reproduce_mnist.FLAGS.unparse_flags()
  reproduce_mnist.FLAGS(["reproduce_mnist.py", "--task=noisy_labels", "--points=0.0", *flags])
  reproduce_mnist.main(None)
  reproduce_mnist.FLAGS.unparse_flags()
  reproduce_mnist.FLAGS(["reproduce_mnist.py", "--task=robustness", *flags])
  reproduce_mnist.main(None)
  # Each method at its chosen gamma (1000); black-box examples from the next seed's xent.
  pairs = {(os.path.relpath(c["model"], tmp_path), os.path.relpath(c["source_model"], tmp_path))
           for c in calls}
  assert ("runs/noisy_labels/margin_all/0.0_gamma=1000_seed=2/model.keras",
          "runs/noisy_labels/xent/0.0_seed=0/model.keras") in pairs
  assert len(calls) == 9 and {c["num_examples"] for c in calls} == {"100"}
  assert {c["dist_norm"] for c in calls} == {"inf"}
  record = reproduce_mnist.read_cells(str(tmp_path))["robustness/margin_all/0.0_seed=1"]
  assert record["gamma"] == 1000 and record["source_cell"] == "noisy_labels/xent/0.0_seed=2"
  calls.clear()
  reproduce_mnist.main(None)
  assert not calls  # Done.

  text = reproduce_mnist.paper_report.report(str(tmp_path), 0, ["xent", "xent_rmsprop"])
  rows = [line for line in text.split("\n") if line.startswith("| white-box FGSM, epsilon 0.1")]
  assert "+10.00 [+10.00, +10.00]" in rows[0]
  assert rows[0].endswith("| reproduced (sign; no size in the paper's text) |")
  ifgsm = [line for line in text.split("\n")
           if line.startswith("| white-box iterative FGSM, epsilon 0.2")][0]
  assert "-5.00 [-29.84, +19.84]" in ifgsm and ifgsm.endswith("not (the interval includes 0) |")
  # Table: xent (and xent_rmsprop) at epsilon 0.1 is 80 + seed points; margin_all
  # compared with both.
  assert ("| 0.1 | 81.0 ± 1.0 (3) | 91.0 ± 1.0 (3) | 81.0 ± 1.0 (3) | +10.00 [+10.00, +10.00] "
          "| +10.00 [+10.00, +10.00] |") in text
  assert "| margin_all − xent | margin_all − xent_rmsprop |" in text
  # A gain of a fraction of a point (a few images) is not a reproduction.
  verdict = reproduce_mnist.paper_report.verdict
  assert verdict((0.5, 0.1, 3), None) == "not (below 1 point)"
  assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"
  # The transfer table: medians per seed, mean ± std, paired difference to xent.
  assert "| per model, mean ± std over seeds (n) | xent | margin_all | xent_rmsprop | " in text
  assert ("| black-box FGSM accuracy (%), epsilon 0.1 | 81.0 ± 1.0 (3) | 91.0 ± 1.0 (3) | "
          "81.0 ± 1.0 (3) | +10.0 [+10.0, +10.0] | +0.0 [+0.0, +0.0] |") in text
  assert ("| white-box l_inf margin (linearised logits), median | 0.060 ± 0.000 (3) | "
          "0.080 ± 0.000 (3) | 0.060 ± 0.000 (3) | +0.020 [+0.020, +0.020] | "
          "+0.000 [+0.000, +0.000] |") in text
  assert ("| alignment of the source's FGSM direction (cross-entropy), median | "
          "0.310 ± 0.010 (3) | 0.410 ± 0.010 (3) | 0.310 ± 0.010 (3) | +0.100 [") in text
  # --readme --readme_tables=transfer: the transfer block is replaced, the others stay.
  readme = tmp_path / "README.md"
  readme.write_text("<!-- paper_report:transfer -->\nold\n<!-- /paper_report:transfer -->\n"
                    "<!-- paper_report:limited_data -->\nkept\n<!-- /paper_report:limited_data -->\n")
  report_module = reproduce_mnist.paper_report
  blocks = report_module.readme_blocks(*report_module.load(str(tmp_path), 0), ["xent"])
  assert report_module.update_readme(str(readme), {"transfer": blocks["transfer"]}) == [
      "transfer"]
  assert "old" not in readme.read_text() and "\nkept\n" in readme.read_text()



def test_reproduce_mnist_robustness_of_a_model_trained_at_one_gamma(
    reproduce_mnist, monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(reproduce_mnist.subprocess, "run", fake_evaluate(calls, fake_mnist([])))
  flags = [f"--out_dir={tmp_path}", "--methods=xent,margin_all", "--seeds=0,1",
           "--gammas=1000", "--robustness_examples=10"]
  for task in ("--task=noisy_labels", "--task=robustness"):
    reproduce_mnist.FLAGS(["reproduce_mnist.py", task, "--points=0.0", *flags])
    reproduce_mnist.main(None)
    reproduce_mnist.FLAGS.unparse_flags()
  models = sorted(os.path.relpath(c["model"], tmp_path) for c in calls)
  assert models[:2] == ["runs/noisy_labels/margin_all/0.0_gamma=1000_seed=0/model.keras",
                        "runs/noisy_labels/margin_all/0.0_gamma=1000_seed=1/model.keras"]


def test_reproduce_mnist_rejects_unknown_methods_and_points(reproduce_mnist, tmp_path):
  reproduce_mnist.FLAGS(["reproduce_mnist.py", f"--out_dir={tmp_path}",
                         "--methods=xent,margin_everything"])
  with pytest.raises(ValueError, match="Unknown method 'margin_everything'"):
    reproduce_mnist.main(None)
  reproduce_mnist.FLAGS.unparse_flags()
  reproduce_mnist.FLAGS(["reproduce_mnist.py", f"--out_dir={tmp_path}",
                         "--task=noisy_labels", "--points=1.5"])
  with pytest.raises(ValueError, match=r"noise fraction must be in \[0, 1\)"):
    reproduce_mnist.main(None)


def test_reproduce_mnist_end_to_end(tmp_path):
  """Two real mnist.py cells on the embedded sample: xent and the all-layer
  logit-score margin, with the margin activity in their record."""
  run(
      [
          script("reproduce_mnist.py"),
          f"--out_dir={tmp_path}",
          "--task=noisy_labels",
          "--points=0.2",
          "--methods=xent,margin_all_logits",
          "--seeds=0",
          "--gammas=30",
          "--train_steps=2",
          "--steps_per_loop=1",
          "--batch_size=16",
      ]
  )
  with open(tmp_path / "cells.jsonl", encoding="utf-8") as f:
    records = {r["method"]: r for r in map(json.loads, f)}
  assert set(records) == {"xent", "margin_all_logits"}
  margin = records["margin_all_logits"]
  assert set(margin["active_fraction_final"]) == {"input", "conv0", "conv1", "fc0", "logits"}
  assert all(0 <= v <= 1 for v in margin["active_fraction_final"].values())
  assert margin["command"]["noisy_label_fraction"] == 0.2
  with open(tmp_path / "runs" / margin["cell"] / "results.json", encoding="utf-8") as f:
    flags = json.load(f)["flags"]
  assert (flags["margin_score"], flags["optimizer"], flags["gamma"]) == (
      "logits", "rmsprop_tf1", 30.0)
