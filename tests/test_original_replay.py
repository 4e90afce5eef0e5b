"""Step 1 of the original MNIST recipe against what the original code computed.

`tests/data/original_step1.npz` (made by scripts/make_original_step1_sample.py from
the golden trajectory of google-research `large_margin`, TF1 graph mode) holds the
original's initial variables, its first batch, and its step-1 logits, distances,
losses, gradients and post-step variables, rms slots and batch-norm statistics.
The project's network gets the same initial variables and batch.

Tolerances are those of the original against itself: re-run with other CPU
kernels (oneDNN off) its step-1 loss moves by 6.7e-5 relative, logits by 8.9e-5,
single distances near a ReLU kink by ~1e-2, and gradients by up to 1.4e-2 of
their max (a ReLU whose pre-activation is within ~1e-4 of 0 flips, adding one
example's rank-1 term). Gradients are therefore compared in relative Frobenius
norm. A structural difference (block order, batch-norm epsilon or momentum,
per-example instead of batch-sum gradients, no stop-gradient, another norm or
layer weights, l2 over other variables, rms slots starting at 0, per-variable
clipping) is off by 1e-1 to 1e1 in these quantities.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from tf_large_margin import original_recipe

DATA = os.path.join(os.path.dirname(__file__), "data", "original_step1.npz")


def relative(actual, expected):
  """||actual - expected|| / ||expected||, in float64."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(DATA))


@pytest.fixture(scope="module")
def batch(golden):
  return golden["images"].astype(np.float32) / np.float32(255.0), golden[
      "step1/labels"
  ]


def initial_model(golden):
  """The original's initial variables; the optimizer's slots are its own (the
  original's start at 1: the optimizer must start them there itself)."""
  model = original_recipe.compile_mnist()
  original_recipe.set_variables(
      model,
      {
          k[len("init/") :]: v
          for k, v in golden.items()
          if k.startswith("init/") and not k.startswith("init/rms/")
      },
  )
  return model


@pytest.fixture(scope="module")
def report(golden, batch):
  return original_recipe.step_report(initial_model(golden), *batch)


@pytest.fixture(scope="module")
def after_step(golden, batch):
  model = initial_model(golden)
  model.train_on_batch(*batch)
  return original_recipe.variables(model)


def test_forward_logits_and_probability_margins(golden, report):
  logits = golden["step1/logits"]
  assert np.abs(report["logits"] - logits).max() <= 2e-4 * np.abs(logits).max()
  np.testing.assert_allclose(
      report["difference_prob"], golden["step1/difference_prob"], atol=2e-4
  )


def test_step_report_casts_a_tensor_of_another_float_dtype(golden, batch, report):
  """Regression: tf.convert_to_tensor(images, tf.float32) raised ValueError for a
  tf.Tensor of another dtype; a float64 tensor of the same values gives the same
  report."""
  images, labels = batch
  again = original_recipe.step_report(
      initial_model(golden), tf.constant(images, tf.float64), labels
  )
  for key in ("logits", "dist", "total_loss"):
    np.testing.assert_allclose(again[key], report[key], rtol=1e-6)


def test_distances_per_layer(golden, report):
  expected = golden["step1/dist"]
  errors = np.abs(report["dist"] - expected) / np.abs(expected)
  assert np.all(np.median(errors, axis=1) < 2e-4), np.median(errors, axis=1)
  assert np.all(errors < 2e-2), errors.max(axis=1)


def test_losses(golden, report):
  np.testing.assert_allclose(
      report["margin_loss_per_layer"], golden["step1/margin_loss_per_layer"], rtol=2e-4
  )
  np.testing.assert_allclose(report["l2_loss"], golden["step1/l2_loss"], rtol=1e-6)
  np.testing.assert_allclose(report["total_loss"], golden["step1/total_loss"], rtol=2e-4)
  np.testing.assert_allclose(
      report["global_grad_norm"], golden["step1/global_grad_norm"], rtol=1e-3
  )


@pytest.mark.parametrize("role", original_recipe.TRAINABLE)
def test_gradients(golden, report, role):
  actual = report["grad/" + role]
  if role == "fc0/kernel":
    actual = actual.ravel()[golden["fc0_kernel_sample_index"]]
    expected = golden["step1/grad/fc0/kernel@sample"]
  else:
    expected = golden["step1/grad/" + role]
  tolerance = 2e-3 if role.startswith("logits") else 2e-2
  assert relative(actual, expected) < tolerance


def after(golden, key):
  if key.endswith("fc0/kernel"):
    return golden["step1/after/" + key + "@sample"]
  return golden["step1/after/" + key]


def ours(after_step, golden, key):
  value = after_step[key]
  if key.endswith("fc0/kernel"):
    return value.ravel()[golden["fc0_kernel_sample_index"]]
  return value


@pytest.mark.parametrize("role", original_recipe.TRAINABLE)
def test_updated_variables_and_rms_slots(golden, after_step, role):
  """One `fit` step (clipping to global norm 5, TF1 RMSProp from slots at 1)."""
  start = golden["init/" + role]
  if role == "fc0/kernel":
    start = start.ravel()[golden["fc0_kernel_sample_index"]]
  update, expected_update = ours(after_step, golden, role) - start, after(
      golden, role
  ) - start
  assert relative(update, expected_update) < 2e-2
  np.testing.assert_allclose(
      ours(after_step, golden, "rms/" + role), after(golden, "rms/" + role), rtol=1e-3
  )


@pytest.mark.parametrize("layer", ["conv0_bn", "conv1_bn"])
def test_batch_norm_moving_statistics(golden, after_step, layer):
  for statistic in ("moving_mean", "moving_variance"):
    key = f"{layer}/{statistic}"
    np.testing.assert_allclose(
        after_step[key], after(golden, key), rtol=1e-4, atol=1e-6
    )
