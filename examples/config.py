"""The settings of a training run of the example scripts: `RunConfig` and its flags.

`RunConfig` holds every setting of one run (data, loss, optimiser, schedule,
outputs) with its defaults; `runner.train_and_evaluate` trains with it. A script
defines the flags of the settings it uses with its own defaults
(`define_flags`), so ``--help`` lists each of them with the value the script
really uses, and turns the parsed flags into its `RunConfig` (`from_flags`).
A program can skip the flags:

    config = RunConfig(loss="xent", train_steps=200, model_dir="/tmp/run")

Norms ("1", "2", "inf" on the command line) are numbers in a `RunConfig`
(`parse_norm`; `format_norm` gives the text back).
"""

import dataclasses
import math
import sys
import typing

from absl import flags

FLAGS = flags.FLAGS

LOSSES = (
    "xent",
    "hinge",
    "margin",
    "jacobian",
    "amsoftmax",
    "arcface",
    "lsoftmax",
    "sphereface",
)
NORMS = ("1", "2", "inf")


def parse_norm(text):
  """'1', '2', 'inf' (or a number) -> 1, 2 or math.inf."""
  if text in (1, 2, math.inf):
    return text
  if str(text) not in NORMS:
    raise ValueError(f"A norm must be one of {', '.join(NORMS)}; got {text!r}.")
  return math.inf if text == "inf" else int(text)


def format_norm(norm):
  """1, 2, math.inf -> '1', '2', 'inf'."""
  return "inf" if norm == math.inf else str(int(norm))


def _setting(default, help_text, choices=None, kind=None):
  """A `RunConfig` field: its default, its flag's help, the allowed values."""
  return dataclasses.field(
      default=default, metadata=dict(help=help_text, choices=choices, kind=kind)
  )


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a training run; the defaults are the library's MNIST ones."""

  # Data.
  data_source: typing.Optional[str] = _setting(
      None,
      "'embedded' (the MNIST sample shipped with the package, mnist only), "
      "'tfds', or a directory with the data set's files.",
  )
  tfds_data_dir: typing.Optional[str] = _setting(
      None, "TFDS data directory (--data_source=tfds)."
  )
  tfds_download: bool = _setting(False, "Let TFDS download missing data.")
  num_validation: int = _setting(
      0, "Training examples held out for validation (0: none). The paper: 5000."
  )
  noisy_label_fraction: float = _setting(
      0.0,
      "Fraction of training labels replaced by a different random class (also "
      "on the validation split).",
  )
  num_train_examples: int = _setting(
      0, "Class-balanced training subset size (0: all)."
  )
  seed: int = _setting(
      0, "Seed of the split, noise, subset, data order and initialisation."
  )
  # Loss.
  loss: str = _setting(
      "margin",
      "Training loss: cross-entropy, Crammer-Singer hinge (+ --xent_weight "
      "xent), Eq. 10 margin, hinge + Jacobian regulariser (Sokolic et al.), "
      "or AM-Softmax/CosFace, ArcFace, L-Softmax, A-Softmax/SphereFace on a "
      "CosineHead replacing the logits layer.",
      choices=LOSSES,
  )
  jacobian_weight: float = _setting(
      0.1, "--loss=jacobian: regulariser weight lambda."
  )
  jacobian_variant: str = _setting(
      "random",
      "--loss=jacobian: one random class row per example, or all rows.",
      choices=("random", "all"),
  )
  cosine_margin: typing.Optional[float] = _setting(
      None, "--loss=amsoftmax|arcface: margin m (default 0.35 / 0.5).", kind=float
  )
  cosine_scale: float = _setting(30.0, "--loss=amsoftmax|arcface: scale s.")
  multiplicative_margin: typing.Optional[int] = _setting(
      None,
      "--loss=lsoftmax|sphereface: integer angular margin m >= 1, the target "
      "logit uses cos(m theta) (1: plain softmax; default: the library's, 2 for "
      "L-Softmax, 4 for SphereFace).",
      kind=int,
  )
  lambda_base: float = _setting(
      1000.0,
      "--loss=lsoftmax|sphereface: lambda at step 0 of the annealing "
      "max(lambda_min, lambda_base * (1 + lambda_gamma * step)^(-lambda_power)) "
      "of the target logit scale * (lambda cos + psi) / (1 + lambda) "
      "(SphereFace's values). 0: constant lambda = --lambda_min (0 and 0: no "
      "annealing, the papers' loss proper).",
  )
  lambda_gamma: float = _setting(0.12, "Decay rate of lambda; see --lambda_base.")
  lambda_power: float = _setting(1.0, "Decay power of lambda; see --lambda_base.")
  lambda_min: float = _setting(5.0, "Floor of lambda; see --lambda_base.")
  gamma: float = _setting(1e4, "Margin gamma, in the units of the margin layers.")
  alpha_factor: float = _setting(
      4.0, "Distances are clipped below at gamma * (1 - alpha_factor)."
  )
  top_k: int = _setting(1, "Competing classes per example.")
  worst_case_loss: bool = _setting(
      True,
      "Only the smallest distance over the top-k classes counts (the original); "
      "false: the penalties of the k classes are summed.",
  )
  dist_norm: float = _setting(
      math.inf, "Norm of the distances: 1, 2 or inf.", kind="norm"
  )
  margin_epsilon: float = _setting(1e-6, "Epsilon added to the gradient norms.")
  margin_score: str = _setting(
      "probabilities",
      "Score of Eq. 10's distance: softmax probabilities (the paper) or logits "
      "(z_y - z_j; does not explode when the softmax saturates).",
      choices=("probabilities", "logits"),
  )
  margin_layers: typing.Tuple[str, ...] = _setting(
      ("input", "conv0", "conv1"),
      "Layers the margin is enforced at: layer names and/or 'input', or 'all'.",
  )
  layers_weights: str = _setting(
      "none",
      "Per-layer weights: 'size' divides each layer's gradient norm by its size "
      "(original).",
      choices=("none", "size"),
  )
  xent_weight: float = _setting(
      0.0, "Weight of the cross-entropy added to the margin or hinge loss."
  )
  # Optimisation.
  optimizer: str = _setting(
      "rmsprop_tf1",
      "rmsprop_tf1: TF1 RMSProp semantics (accumulators start at 1); rmsprop: "
      "Keras'; momentum: SGD with --momentum.",
      choices=("rmsprop_tf1", "rmsprop", "momentum", "adam"),
  )
  learning_rate: float = _setting(0.1, "Initial learning rate.")
  momentum: float = _setting(0.0, "Momentum (rmsprop*, momentum).")
  optimizer_epsilon: float = _setting(1e-2, "Epsilon of RMSProp / Adam.")
  lr_schedule: str = _setting(
      "exponential",
      "exponential: x lr_decay_rate every lr_decay_steps (staircase); "
      "piecewise: x lr_decay_rate at each of lr_boundaries.",
      choices=("constant", "exponential", "piecewise"),
  )
  lr_decay_rate: float = _setting(0.96, "Learning-rate decay factor.")
  lr_decay_steps: int = _setting(2000, "Steps between exponential decays.")
  lr_boundaries: typing.Tuple[float, ...] = _setting(
      (0.5, 0.75),
      "Piecewise schedule: fractions of the training steps where the rate is "
      "multiplied by lr_decay_rate.",
      kind=float,
  )
  clip_norm: float = _setting(5.0, "Global gradient-norm clipping (0: none).")
  weight_decay: float = _setting(
      0.0,
      "Adds weight_decay * sum(v^2) / 2 over all trainable variables to the loss.",
  )
  # Run.
  batch_size: int = _setting(256, "Global batch size.")
  train_steps: int = _setting(1500, "Training steps (unless --epochs).")
  epochs: int = _setting(
      0,
      "If > 0: train this many passes over the training set (num_examples // "
      "batch_size steps each, one loop per pass) instead of --train_steps.",
  )
  steps_per_loop: int = _setting(
      100,
      "Steps between validation, logs and checkpoints (must divide "
      "--train_steps; with --epochs a loop is an epoch).",
  )
  checkpoint_steps: int = _setting(
      0,
      "Steps between resumable checkpoints within a loop (0: only at the end of "
      "each loop). A killed run started again with the same flags resumes from "
      "the last one and ends as an uninterrupted run.",
  )
  model_dir: str = _setting(
      "/tmp/tf_large_margin",
      "Output directory; a run resumes from the checkpoint found there.",
  )
  strategy: str = _setting(
      "default",
      "tf.distribute strategy; multi_worker reads TF_CONFIG.",
      choices=("default", "mirrored", "multi_worker"),
  )
  num_logical_cpus: int = _setting(
      0,
      "If > 1: split the CPU into this many logical devices (mirrored training "
      "on a CPU-only machine).",
  )
  deterministic: bool = _setting(
      False,
      "tf.config.experimental.enable_op_determinism(): bitwise reproducible "
      "runs (slower).",
  )
  verbose: int = _setting(
      1, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per loop."
  )

  def __post_init__(self):
    for field in dataclasses.fields(self):
      choices = field.metadata["choices"]
      if choices is not None and getattr(self, field.name) not in choices:
        raise ValueError(
            f"{field.name} must be one of {choices}; got "
            f"{getattr(self, field.name)!r}."
        )
    object.__setattr__(self, "dist_norm", parse_norm(self.dist_norm))
    for name in ("margin_layers", "lr_boundaries"):
      object.__setattr__(self, name, tuple(getattr(self, name)))

  def replace(self, **changes):
    """A copy with ``changes``."""
    return dataclasses.replace(self, **changes)

  def to_json(self):
    """The settings as JSON values (norms as text)."""
    values = dataclasses.asdict(self)
    values["dist_norm"] = format_norm(self.dist_norm)
    return values


FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}


class _NormParser(flags.ArgumentParser):
  """Parses a norm flag: '1', '2' or 'inf' -> 1, 2 or math.inf."""

  def parse(self, argument):
    return parse_norm(argument)

  def flag_type(self):
    return "norm"


class _NormSerializer(flags.ArgumentSerializer):
  """Writes a norm flag's value as on the command line: 1, 2, inf."""

  def serialize(self, value):
    return format_norm(value)


def _define(name, default, help_text, module_name, flag_values):
  """Defines the flag of `RunConfig` field ``name`` with ``default``."""
  meta = FIELDS[name].metadata
  kind, choices = meta["kind"], meta["choices"]
  field_type = FIELDS[name].type
  kwargs = dict(module_name=module_name, flag_values=flag_values)
  if kind == "norm":
    return flags.DEFINE(
        _NormParser(),
        name,
        default,
        help_text,
        serializer=_NormSerializer(),
        **kwargs,
    )
  if choices is not None:
    return flags.DEFINE_enum(name, default, list(choices), help_text, **kwargs)
  if typing.get_origin(field_type) is tuple:
    return flags.DEFINE_list(
        name, [str(v) for v in default or ()], help_text, **kwargs
    )
  if field_type is bool:
    return flags.DEFINE_bool(name, default, help_text, **kwargs)
  define = {
      int: flags.DEFINE_integer,
      float: flags.DEFINE_float,
  }.get(kind or field_type, flags.DEFINE_string)
  return define(name, default, help_text, **kwargs)


# {id(flag_values): (defaults, names)} of the flags `define_flags` defined.
_DEFINED = {}


def define_flags(
    defaults=None, names=None, helps=None, module_name=None, flag_values=FLAGS
):
  """Defines the flags of a script's settings with the script's defaults.

  Call it at import time of the script (its main module), so ``--help`` lists
  every flag with its default.

  Args:
    defaults: a `RunConfig`, or a dict of the script's defaults that differ
      from `RunConfig`'s.
    names: the settings given as flags (default: all); `from_flags` takes the
      others from ``defaults``.
    helps: {name: help text} replacing the generic help of some flags.
    module_name: the module the flags belong to (default: the main module).
    flag_values: where to define them (default: absl's global ``FLAGS``).

  Returns:
    The `RunConfig` of the defaults.
  """
  if not isinstance(defaults, RunConfig):
    defaults = RunConfig(**(defaults or {}))
  names = list(FIELDS) if names is None else list(names)
  helps = helps or {}
  module_name = module_name or sys.argv[0]
  unknown = set(names) - set(FIELDS)
  if unknown:
    raise ValueError(f"Unknown settings {sorted(unknown)}; see RunConfig.")
  for name in names:
    help_text = helps.get(name, FIELDS[name].metadata["help"])
    _define(name, getattr(defaults, name), help_text, module_name, flag_values)
  _DEFINED[id(flag_values)] = (defaults, names)
  return defaults


def set_defaults(values, flag_values=FLAGS):
  """Sets flag defaults (a --config set); flags typed on the command line win."""
  for name, value in values.items():
    if isinstance(value, tuple):
      value = [str(v) for v in value]
    flag_values.set_default(name, value)


def from_flags(flag_values=FLAGS, **overrides):
  """The `RunConfig` of the parsed flags of `define_flags` (and ``overrides``).

  A flag typed on the command line wins over a default: --train_steps typed
  alone trains that many steps even where the defaults set --epochs; typing both
  a positive --epochs and --train_steps is an error.
  """
  defaults, names = _DEFINED[id(flag_values)]
  values = {name: flag_values[name].value for name in names}
  if "lr_boundaries" in values:
    values["lr_boundaries"] = [float(f) for f in values["lr_boundaries"]]
  if {"epochs", "train_steps"} <= values.keys():
    typed_steps = flag_values["train_steps"].present
    typed_epochs = flag_values["epochs"].present
    if typed_steps and typed_epochs and values["epochs"] > 0:
      raise ValueError(
          f"--epochs={values['epochs']} and --train_steps={values['train_steps']} "
          "conflict: give one of them."
      )
    if typed_steps and not typed_epochs:
      values["epochs"] = 0
  values.update(overrides)
  return defaults.replace(**values)


def to_argv(values):
  """{setting: value} -> ["--setting=value", ...] for a script's command line
  (lists comma-separated, norms as text)."""
  argv = []
  for name, value in values.items():
    if name in FIELDS and FIELDS[name].metadata["kind"] == "norm":
      value = format_norm(parse_norm(value))
    elif isinstance(value, (list, tuple)):
      value = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
      value = str(value).lower()
    argv.append(f"--{name}={value}")
  return argv


def script_flags():
  """{name: value} of the main module's flags (JSON values: norms as text)."""
  if not FLAGS.is_parsed():
    return {}
  values = {}
  for flag in FLAGS.get_key_flags_for_module(sys.argv[0]):
    value = flag.value
    values[flag.name] = format_norm(value) if flag.flag_type() == "norm" else value
  return dict(sorted(values.items()))
