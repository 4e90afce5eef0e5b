"""Every example script's --help lists all its flags, each with the default the
script really uses.

Each script runs as ``__main__`` in a fresh process with `absl.app.run` stubbed
out: the flags are parsed with no arguments, the help text is the one ``--help``
prints (`FlagValues.main_module_help`), and the real defaults are the values the
script would run with (its ``run_config()``, the `config.RunConfig` it trains
with, for the training scripts; the parsed flags for the others).
"""

import json
import re

import pytest

from example_runs import EXAMPLES
from example_runs import run
from example_runs import script

INTROSPECT = r"""
import json, runpy, sys
from absl import app, flags
script = sys.argv[1]
sys.argv = [script]
sys.path.insert(0, {examples!r})
app.run = lambda main, argv=None, **kwargs: None  # import the script, no run
# Flags of libraries the scripts import (TensorFlow defines a few), not theirs.
LIBRARIES = ("absl.", "tensorflow.", "keras.", "tensorboard.")
module = runpy.run_path(script, run_name="__main__")
FLAGS = flags.FLAGS
FLAGS(sys.argv)
config = module["run_config"]() if "run_config" in module else None


def shown(flag, value):
  if value is None:
    return None
  if isinstance(value, bool):
    return str(value).lower()
  return flag.serializer.serialize(value) if flag.serializer else str(value)


defined = {{
    flag.name: module_name
    for module_name, module_flags in FLAGS.flags_by_module_dict().items()
    for flag in module_flags
    if not module_name.startswith(LIBRARIES)
}}
real = {{}}
for name in defined:
  value = FLAGS[name].value
  if config is not None and hasattr(config, name):
    value = getattr(config, name)
  real[name] = shown(FLAGS[name], value)
print(json.dumps(dict(
    help=FLAGS.main_module_help(),
    defined=defined,
    real=real,
    config_fields=None if config is None else list(config.to_json()),
)))
"""

SCRIPTS = [
    "mnist.py",
    "cifar10.py",
    "imagenet.py",
    "compare_methods.py",
    "reproduce_mnist.py",
    "evaluate.py",
]
# Settings of RunConfig that are not flags of a training script.
NOT_FLAGS = {
    "imagenet.py": {"num_validation", "num_train_examples", "noisy_label_fraction"},
}


def listed_flags(help_text):
  """{flag name: default shown (None: no default line)} of a help text."""
  listed = {}
  for block in re.split(r"\n  --", "\n" + help_text)[1:]:
    name = re.match(r"(?:\[no\])?(\w+):", block)[1]
    # absl wraps long lines at spaces; the defaults have none.
    default = re.search(r"\(default: '(.*?)'\)", " ".join(block.split()))
    listed[name] = default[1] if default else None
  return listed


def introspect(name):
  process = run(["-c", INTROSPECT.format(examples=EXAMPLES), script(name)])
  return json.loads(process.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_flag_with_its_real_default(name):
  info = introspect(name)
  listed = listed_flags(info["help"])
  missing = sorted(set(info["defined"]) - set(listed))
  assert not missing, f"{name} --help does not list {missing}"
  for flag, default in listed.items():
    assert default == info["real"][flag], (
        f"{name} --{flag}: --help shows {default!r}, the script uses "
        f"{info['real'][flag]!r}"
    )
  if info["config_fields"] is not None and name != "compare_methods.py":
    # The training scripts take every setting of RunConfig as a flag.
    expected = set(info["config_fields"]) - NOT_FLAGS.get(name, set())
    assert expected <= set(listed)


def test_mnist_help_shows_its_own_defaults():
  """Not the generic ones: mnist.py's learning rate is 0.01 (RunConfig's 0.1 is
  the original configuration's, --config=original)."""
  process = run([script("mnist.py"), "--help"], check=False)
  listed = listed_flags(process.stdout)
  assert listed["learning_rate"] == "0.01"
  assert (listed["data_source"], listed["dist_norm"]) == ("embedded", "inf")
  assert "'original' (the same with learning_rate=0.1, epochs=200)" in " ".join(
      process.stdout.split()
  )
