"""The output-layer losses under every Keras backend (issue 20): JAX and PyTorch
give TensorFlow's values and gradients (float64, to 1e-10).

tests/backend_values.py computes every case (LargeMarginLoss in its settings, the
hinge, AM-Softmax / CosFace, ArcFace, L-Softmax, SphereFace, CosineHead,
LambdaDecay) once per backend in a fresh process; under JAX and PyTorch it runs with
TensorFlow made unimportable, so `import tf_large_margin` and the losses are shown
not to need it.

jax and torch are optional (`pip install -e ".[backends]"`). Without one of them its
test is skipped, except under CI (the environment variable CI set, as CI does and
.ci/run does): there a missing backend fails the test instead, so CI cannot pass
without testing it.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALUES = os.path.join(ROOT, "tests", "backend_values.py")
TOLERANCE = 1e-10


def compute(backend, out, script=VALUES, **environment):
  """Runs ``script`` (backend_values.py) under ``backend`` with the extra
  ``environment`` variables; returns its results as a dict."""
  path = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=path, **environment)
  result = subprocess.run(
      [sys.executable, script, str(out)],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


def require(module):
  """Skips without ``module``, or fails under CI."""
  if importlib.util.find_spec(module) is not None:
    return
  message = f'{module} is not installed (pip install -e ".[backends]")'
  if os.environ.get("CI"):
    pytest.fail(f"{message}: CI must test every backend.")
  pytest.skip(message)


@pytest.fixture(scope="module")
def tensorflow_values(tmp_path_factory):
  return compute("tensorflow", tmp_path_factory.mktemp("tensorflow") / "values.npz")


def test_tensorflow_values_are_float64_and_finite(tensorflow_values):
  """The comparison is meaningful: the cases ran in float64 (LambdaDecay's values
  are float32 by design) and nothing is NaN or infinite."""
  numbers = {k: v for k, v in tensorflow_values.items() if not k.startswith("error/")}
  assert len(numbers) > 40
  for key, value in numbers.items():
    float32 = key == "LambdaDecay/value"
    assert value.dtype == ("float32" if float32 else "float64"), key
    assert np.all(np.isfinite(value)), key


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_gives_tensorflow_values_and_gradients(
    backend, tensorflow_values, tmp_path
):
  require(backend)
  values = compute(backend, tmp_path / "values.npz")
  assert values.keys() == tensorflow_values.keys()
  assert "needs the TensorFlow backend" in str(values["error/JacobianModel"])
  assert f'backend "{backend}"' in str(values["error/JacobianModel"])
  for key, expected in tensorflow_values.items():
    if key.startswith("error/"):
      continue
    assert values[key].dtype == expected.dtype, key
    np.testing.assert_allclose(values[key], expected, rtol=0, atol=TOLERANCE, err_msg=key)
