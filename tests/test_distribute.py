"""tf.distribute: Mirrored (2 logical CPUs) and multi-worker (2 local processes)
training give the weights of one single-device run with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

RUN = os.path.join(os.path.dirname(__file__), "distributed_run.py")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(strategy, out, env=None):
  return subprocess.Popen(
      [sys.executable, RUN, f"--strategy={strategy}", f"--out={out}"],
      env=dict(os.environ, **(env or {})),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )


def finish(process, timeout=300):
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]


def load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
  out = tmp_path_factory.mktemp("single") / "w.npz"
  finish(start("default", out))
  return load(out)


def assert_same_weights(result, reference):
  assert result.keys() == reference.keys()
  for key in reference:
    np.testing.assert_allclose(result[key], reference[key], atol=1e-5, err_msg=key)


def test_weights_move(single_device, tmp_path):
  """The comparison is meaningful: training changed the weights."""
  out = tmp_path / "untrained.npz"
  finish(start("untrained", out))
  initial = load(out)
  assert (
      max(np.abs(initial[k] - single_device[k]).max() for k in initial if k != "loss")
      > 1e-2
  )


def test_mirrored_two_devices_matches_single_device(single_device, tmp_path):
  out = tmp_path / "w.npz"
  finish(start("mirrored", out))
  assert_same_weights(load(out), single_device)


def test_multi_worker_matches_single_process(single_device, tmp_path):
  ports = [free_port(), free_port()]
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  workers = [
      start(
          "multi_worker",
          tmp_path / f"w{i}.npz",
          env={
              "TF_CONFIG": json.dumps(
                  {"cluster": cluster, "task": {"type": "worker", "index": i}}
              )
          },
      )
      for i in range(2)
  ]
  for worker in workers:
    finish(worker)
  for i in range(2):
    assert_same_weights(load(tmp_path / f"w{i}.npz"), single_device)
