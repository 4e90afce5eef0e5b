"""The package's shape: every public module is reachable as `tlm.<name>`, none is huge."""

import os

import tf_large_margin as tlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "tf_large_margin")
# Internal modules: helpers of the public ones, not part of the user-facing API.
INTERNAL = {"__init__", "compat", "argument_checks", "labels"}
MAX_LINES = 550  # "no module above ~500 lines" (issue 12)


def modules():
  return sorted(n[:-3] for n in os.listdir(PACKAGE_DIR) if n.endswith(".py"))


def test_public_modules_are_attributes_of_the_package():
  missing = [
      name for name in modules()
      if name not in INTERNAL and not hasattr(tlm, name)
  ]
  assert not missing, f"import these in tf_large_margin/__init__.py: {missing}"


def test_no_module_is_above_the_size_limit():
  sizes = {}
  for directory in ("tf_large_margin", "examples", "tests", "scripts", "benchmarks"):
    for name in os.listdir(os.path.join(ROOT, directory)):
      if name.endswith(".py"):
        with open(os.path.join(ROOT, directory, name), encoding="utf-8") as f:
          sizes[f"{directory}/{name}"] = sum(1 for _ in f)
  large = {path: n for path, n in sizes.items() if n > MAX_LINES}
  assert not large, f"split these by concept: {large}"
