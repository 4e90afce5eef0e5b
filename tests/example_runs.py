"""Running the example scripts in fresh processes, for the example tests.

Fresh processes because absl flags are global and logical devices must be
configured before TensorFlow starts.
"""

import json
import os
import subprocess
import sys
import zipfile

EXAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
)
FAST = ["--train_steps=4", "--steps_per_loop=2", "--batch_size=16", "--verbose=2"]


def script(name):
  return os.path.join(EXAMPLES, name)


def run(args, check=True, env=None):
  """Runs ``python args...``; asserts it succeeded unless not ``check``."""
  process = subprocess.run(
      [sys.executable] + args,
      capture_output=True,
      text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})),
      timeout=300,
      check=False,
  )
  if check:
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
  return process


def run_example(name, model_dir, *flags):
  """Runs example ``name`` into ``model_dir``: (its results.json, its stdout)."""
  process = run([script(name), f"--model_dir={model_dir}", *flags])
  with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as f:
    return json.load(f), process.stdout


def compiled_loss_name(model_path):
  """Class name of the loss a saved .keras model was compiled with (None)."""
  with zipfile.ZipFile(model_path) as archive:
    config = json.loads(archive.read("config.json"))
  loss = config["compile_config"]["loss"]
  return None if loss is None else loss["class_name"]


def check_common_results(results, stdout, model_dir, steps=(2, 4)):
  assert results["train_steps"] == steps[-1]
  assert [row["step"] for row in results["history"]] == list(steps)
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert f"clean test accuracy: {results['test_accuracy']:.4f}" in stdout
  assert os.listdir(os.path.join(model_dir, "tensorboard"))
  assert not os.path.exists(os.path.join(model_dir, "checkpoint"))  # done: removed.
