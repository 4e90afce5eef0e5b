"""The docstrings' examples run as doctests (outputs compared as printed)."""

import doctest
import importlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_large_margin as tlm

PACKAGE_DIR = os.path.dirname(tlm.__file__)
MODULES = sorted(
    name[: -len(".py")]
    for name in os.listdir(PACKAGE_DIR)
    if name.endswith(".py") and name != "__init__.py"
)


def examples(module):
  finder = doctest.DocTestFinder(exclude_empty=True)
  extraglobs = {"np": np, "keras": keras, "tf": tf, "tlm": tlm}
  return [t for t in finder.find(module, extraglobs=extraglobs) if t.examples]


def test_the_package_has_doctests():
  count = sum(
      len(examples(importlib.import_module(f"tf_large_margin.{m}"))) for m in MODULES
  )
  assert count >= 8


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(f"tf_large_margin.{name}")
  runner = doctest.DocTestRunner(
      optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  )
  for test in examples(module):
    runner.run(test)
  results = runner.summarize(verbose=False)
  assert results.failed == 0, f"{results.failed} doctest(s) of {name} failed (above)"
