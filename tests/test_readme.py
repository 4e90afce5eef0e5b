"""The README's python blocks run as written (each on its own, in a fresh process).

Blocks that train for several epochs run here with fewer: `SHORTER` lists each such
substitution, and the test fails if one no longer applies (the README changed), so
what runs is the README's code with only those numbers changed. A block that sets
another Keras backend (``os.environ["KERAS_BACKEND"] = "jax"``) is skipped when
that backend is not installed, except under CI, where it fails (as
tests/test_backends.py).
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# (text in a block, what it becomes here): the full runs take minutes on a CPU.
SHORTER = {
    "epochs=10)": "epochs=1)",
}


def python_blocks():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def shortened(block):
  for old, new in SHORTER.items():
    block = block.replace(old, new)
  return block


def test_the_readme_has_blocks_and_every_shortening_applies():
  blocks = python_blocks()
  assert len(blocks) >= 3
  for old in SHORTER:
    assert any(old in block for block in blocks), f"{old!r} is no longer in README"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, tmp_path):
  code = shortened(python_blocks()[index])
  backend = re.search(r'os.environ\["KERAS_BACKEND"\] = "(\w+)"', code)
  if backend and importlib.util.find_spec(backend.group(1)) is None:
    message = f"the Keras backend {backend.group(1)} is not installed"
    if os.environ.get("CI"):
      pytest.fail(f"{message}: CI must run every README block.")
    pytest.skip(message)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-c", code],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert result.returncode == 0, (
      f"README block {index} failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}"
  )
