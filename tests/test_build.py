"""BUILD is checked without Bazel: it is Starlark, i.e. Python syntax.

The file is executed with stand-ins for the Bazel rules that record every target;
the tests then check it against the repository: every module, script and test file
has exactly one target, every dep names an existing target, every source and data
file exists, and BUILD is what `scripts/generate_build.py` writes from the imports.
"""

import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "BUILD")
SOURCE_DIRS = ("tf_large_margin", "examples", "scripts", "benchmarks", "tests")


def load_targets():
  """Executes BUILD with recording rules; returns {name: attributes}."""
  targets = {}

  def rule(kind):
    def record(name, **attributes):
      assert name not in targets, f"target {name!r} defined twice"
      targets[name] = dict(attributes, kind=kind)

    return record

  def build_glob(patterns):
    return sorted(p for pattern in patterns for p in glob.glob(pattern, root_dir=ROOT))

  namespace = {
      "load": lambda *args: None,
      "package": lambda **kwargs: None,
      "glob": build_glob,
      "py_library": rule("py_library"),
      "py_binary": rule("py_binary"),
      "py_test": rule("py_test"),
  }
  with open(BUILD, encoding="utf-8") as f:
    exec(compile(f.read(), BUILD, "exec"), namespace)  # pylint: disable=exec-used
  return targets


@pytest.fixture(scope="module")
def targets():
  return load_targets()


def repository_python_files():
  return sorted(
      os.path.join(d, name)
      for d in SOURCE_DIRS
      for name in os.listdir(os.path.join(ROOT, d))
      if name.endswith(".py")
  )


def test_every_python_file_has_exactly_one_target(targets):
  owners = {}
  for name, attributes in targets.items():
    for src in attributes["srcs"]:
      if src != "tests/conftest.py":
        owners.setdefault(src, []).append(name)
  files = [p for p in repository_python_files() if p != "tests/conftest.py"]
  missing = [p for p in files if p not in owners]
  twice = {p: names for p, names in owners.items() if len(names) > 1}
  assert not missing, f"files without a BUILD target: {missing}"
  assert not twice, f"files in several targets: {twice}"
  stale = [p for p in owners if not os.path.exists(os.path.join(ROOT, p))]
  assert not stale, f"BUILD names files that do not exist: {stale}"


def test_every_test_file_is_a_py_test(targets):
  tests = sorted(
      os.path.basename(p)[: -len(".py")]
      for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
  )
  py_tests = sorted(n for n, a in targets.items() if a["kind"] == "py_test")
  assert py_tests == tests


def test_every_dep_names_an_existing_target(targets):
  unknown = {
      name: [d for d in a.get("deps", []) if d.startswith(":") and d[1:] not in targets]
      for name, a in targets.items()
  }
  unknown = {name: deps for name, deps in unknown.items() if deps}
  assert not unknown, f"deps naming no target: {unknown}"
  external = {
      d for a in targets.values() for d in a.get("deps", []) if not d.startswith(":")
  }
  assert all(d.startswith("@pypi//") for d in external), external


def test_data_files_exist(targets):
  for name, attributes in targets.items():
    data = attributes.get("data", [])
    for path in data:
      assert os.path.exists(os.path.join(ROOT, path)), (name, path)
    if "data" in attributes and attributes["kind"] != "py_test":
      assert data, f"{name}: its data glob matches no file"


def test_build_is_what_the_generator_writes():
  spec = importlib.util.spec_from_file_location(
      "generate_build", os.path.join(ROOT, "scripts", "generate_build.py")
  )
  generator = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(generator)
  with open(BUILD, encoding="utf-8") as f:
    assert f.read() == generator.render(), (
        "BUILD is out of date: run python scripts/generate_build.py"
    )
