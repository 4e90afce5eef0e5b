"""Resume after a kill: examples/mnist.py killed (SIGKILL) mid-epoch and started
again ends with the weights of an uninterrupted run.

The runner checkpoints model and optimizer every --checkpoint_steps steps and the
training data is a function of the step, so the restarted run sees the batches
the uninterrupted one saw.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np

import tf_large_margin  # pylint: disable=unused-import  (registers the classes)

MNIST = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "mnist.py"
)
# 200 examples in batches of 16: a pass is 12.5 steps (batches span two passes);
# 3 loops of 10 steps, a checkpoint every 3 steps.
TRAIN_STEPS, STEPS_PER_LOOP = 30, 10
FLAGS = [
    "--num_train_examples=200",
    "--batch_size=16",
    f"--train_steps={TRAIN_STEPS}",
    f"--steps_per_loop={STEPS_PER_LOOP}",
    "--checkpoint_steps=3",
    "--margin_layers=input,conv1",
    "--verbose=2",
]
KILL_AFTER = "Checkpoint of step 12 "
TIMEOUT = 300


def start(model_dir):
  return subprocess.Popen(
      [sys.executable, MNIST, f"--model_dir={model_dir}", *FLAGS],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
  )


def finish(process):
  output = process.communicate(timeout=TIMEOUT)[0]
  assert process.returncode == 0, output[-3000:]
  return output


def kill_after(process, marker):
  """Reads the process' output until ``marker``, then SIGKILLs it."""
  lines = []
  deadline = time.time() + TIMEOUT
  for line in process.stdout:
    lines.append(line)
    if marker in line:
      process.send_signal(signal.SIGKILL)
      break
    assert time.time() < deadline, "".join(lines[-50:])
  process.communicate(timeout=TIMEOUT)
  assert process.returncode == -signal.SIGKILL, "".join(lines[-50:])
  return "".join(lines)


def final_state(model_dir):
  """The weights and optimizer variables (step, slots) of the saved final model."""
  model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
  assert int(model.optimizer.iterations) == TRAIN_STEPS
  return [v.numpy() for v in model.weights + model.optimizer.variables]


def test_killed_mid_epoch_then_restarted_ends_as_uninterrupted(tmp_path):
  uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
  # Both start at once (each uses about one core).
  reference = start(uninterrupted)
  interrupted = start(killed)
  killed_log = kill_after(interrupted, KILL_AFTER)
  assert not (killed / "results.json").exists()
  assert (killed / "checkpoint" / "latest.weights.h5").exists()
  resumed_log = finish(start(killed))
  finish(reference)

  # The restart resumed from a checkpoint inside a loop and a pass.
  restored = int(re.search(r"Restored the checkpoint of step (\d+)", resumed_log)[1])
  assert 12 <= restored < TRAIN_STEPS, killed_log[-2000:]
  with open(killed / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert results["resumed_at_step"] == restored
  assert [row["step"] for row in results["history"]] == [10, 20, 30]
  assert not (killed / "checkpoint").exists()  # removed once the run is done
  if restored % STEPS_PER_LOOP:
    # The loop the kill cut short is finished first, then the others.
    loop = restored // STEPS_PER_LOOP + 1
    assert f"Loop {loop}/3 (steps {restored + 1}-{loop * 10} of 30" in resumed_log

  expected, actual = final_state(uninterrupted), final_state(killed)
  assert len(expected) == len(actual)
  for e, a in zip(expected, actual):
    np.testing.assert_array_equal(a, e)
