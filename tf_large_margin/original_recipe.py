"""The original code's MNIST training recipe as Keras objects, and its variables.

The google-research `large_margin` MNIST configuration (`mnist_config.py`,
`train.py`), setting for setting:

- network: `architectures.mnist_cnn` (conv-ReLU-ReLU-maxpool-BN blocks);
- loss: Eq. 10 alone (the model's `LayerMargin`, no compiled loss), dist_norm inf
  at [input, conv0, conv1] (the batch-norm outputs), gamma 1e4, alpha_factor 4,
  top_k 1, epsilon 1e-6, layer weights = each layer's size, plus
  5e-4 * sum_v sum(v^2) / 2 over all trainable variables (`WeightDecay`);
- optimizer: TF1 RMSProp (`RMSpropTF1`: rms slots start at 1), learning rate 0.1
  decayed x0.96 every 2000 steps (staircase), rho 0.9, momentum 0, epsilon 1e-2,
  gradients clipped to global norm 5;
- batch 256, every batch full (the data are repeated before batching).

`compile_mnist` builds and compiles it; `set_variables` / `variables` move the
original's variables (golden-trajectory role names such as "conv0/kernel",
"conv0_bn/moving_mean", "rms/fc0/bias") in and out of that model, which is how
`tests/test_original_replay.py` checks a training step against the original's.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import architectures
from tf_large_margin import argument_checks
from tf_large_margin import margin_loss
from tf_large_margin import margin_penalty
from tf_large_margin.losses import LayerMargin
from tf_large_margin.models import MarginModel
from tf_large_margin.optimizers import RMSpropTF1
from tf_large_margin.regularizers import apply_weight_decay

MARGIN_LAYERS = ("input", "conv0", "conv1")
BATCH_SIZE = 256
WEIGHT_DECAY = 5e-4

# Role name (the original's variable scopes, shortened) -> (Keras layer, attribute).
_VARIABLES = {
    "conv0/kernel": ("conv0_conv", "kernel"),
    "conv0_bn/gamma": ("conv0", "gamma"),
    "conv0_bn/beta": ("conv0", "beta"),
    "conv0_bn/moving_mean": ("conv0", "moving_mean"),
    "conv0_bn/moving_variance": ("conv0", "moving_variance"),
    "conv1/kernel": ("conv1_conv", "kernel"),
    "conv1_bn/gamma": ("conv1", "gamma"),
    "conv1_bn/beta": ("conv1", "beta"),
    "conv1_bn/moving_mean": ("conv1", "moving_mean"),
    "conv1_bn/moving_variance": ("conv1", "moving_variance"),
    "fc0/kernel": ("fc0", "kernel"),
    "fc0/bias": ("fc0", "bias"),
    "logits/kernel": ("logits", "kernel"),
    "logits/bias": ("logits", "bias"),
}
# The original's trainable variables, in its order.
TRAINABLE = tuple(
    role for role in _VARIABLES if not role.split("/")[1].startswith("moving")
)


def margin():
  """Eq. 10 with the original MNIST hyper-parameters, the model's margin setting."""
  return LayerMargin(
      gamma=1e4,
      alpha_factor=4.0,
      top_k=1,
      dist_norm=np.inf,
      epsilon=1e-6,
      use_approximation=True,
      worst_case_loss=True,
  )


def optimizer(learning_rate=0.1):
  """TF1 RMSProp with the original's decay, epsilon and global-norm clipping."""
  return RMSpropTF1(
      learning_rate=keras.optimizers.schedules.ExponentialDecay(
          learning_rate, decay_steps=2000, decay_rate=0.96, staircase=True
      ),
      rho=0.9,
      momentum=0.0,
      epsilon=1e-2,
      global_clipnorm=5.0,
  )


def compile_mnist(learning_rate=0.1, metrics=("accuracy",)):
  """The original MNIST network and recipe: a compiled `MarginModel` (the margin
  term alone, no compiled loss)."""
  model = MarginModel.from_model(
      architectures.mnist_cnn(),
      margin_layers=list(MARGIN_LAYERS),
      layers_weights="size",
      margin=margin(),
  )
  apply_weight_decay(model, WEIGHT_DECAY)
  model.compile(optimizer(learning_rate), loss=None, metrics=list(metrics))
  return model


def _variable(model, role):
  layer, attribute = _VARIABLES[role]
  return getattr(model.get_layer(layer), attribute)


def _rms_slots(model):
  """{role: rms slot} of the model's `RMSpropTF1` (built here if it is not yet).

  The optimizer creates one slot per variable, in the order of the list it was
  built with: the model's trainable variables.
  """
  optimizer_ = model.optimizer
  if not optimizer_.built:
    optimizer_.build(model.trainable_variables)
  slots = [v for v in optimizer_.variables if v.path.endswith("_velocity")]
  ids = [id(v) for v in model.trainable_variables]
  if len(slots) != len(ids):
    raise ValueError(f"Expected {len(ids)} rms slots; found {len(slots)}.")
  return {role: slots[ids.index(id(_variable(model, role)))] for role in TRAINABLE}


def set_variables(model, arrays):
  """Assigns the original's variables (and "rms/<role>" slots if given) to ``model``.

  Args:
    model: from `compile_mnist` (or `architectures.mnist_cnn` without slots).
    arrays: mapping of role names to arrays; roles missing from it are left.
  """
  unknown = [
      k for k in arrays if k not in _VARIABLES and not k.startswith(("rms/", "momentum/"))
  ]
  if unknown:
    raise ValueError(f"Unknown variables {unknown}; known: {list(_VARIABLES)}.")
  for role in _VARIABLES:
    if role in arrays:
      _variable(model, role).assign(arrays[role])
  if any(k.startswith("rms/") for k in arrays):
    for role, slot in _rms_slots(model).items():
      if "rms/" + role in arrays:
        slot.assign(arrays["rms/" + role])


def variables(model, slots=True):
  """{role: array} of ``model``'s variables (with "rms/<role>" if ``slots``)."""
  values = {role: np.asarray(_variable(model, role)) for role in _VARIABLES}
  if slots:
    values.update(
        {"rms/" + role: np.asarray(slot) for role, slot in _rms_slots(model).items()}
    )
  return values


def step_report(model, images, labels):
  """What one training step of ``model`` computes; weights, batch-norm statistics
  and optimizer are left as they were (the loss trackers are updated).

  Mirrors the quantities the original's training step has (and its golden
  trajectory records), from the model's own training-mode forward pass:

  Returns:
    dict with "logits" [B, C], "difference_prob" [B] (p_y - max_{j != y} p_j),
    "dist" [layers, B] (Eq. 10's distances before clipping),
    "margin_loss_per_layer" [layers], "l2_loss" (sum_v sum(v^2) / 2 over the
    trainable variables), "total_loss" (the loss `MarginModel` differentiates),
    "grad/<role>" (its gradient per trainable variable, before clipping) and
    "global_grad_norm".
  """
  moving = [v for v in model.non_trainable_variables]
  saved = [np.asarray(v) for v in moving]
  x = argument_checks.float32_inputs(images)
  y = tf.convert_to_tensor(labels)
  settings = model.margin
  with tf.GradientTape() as weights_tape:
    total, _ = model.total_loss(x, y, training=True)
  gradients = weights_tape.gradient(total, model.trainable_variables)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    logits, hidden = model.margin_endpoints(x, training=True)
  layers_list = [x] + list(hidden)
  one_hot = tf.one_hot(y, logits.shape[-1])
  differences, distances = margin_loss.margin_distances(
      logits=logits,
      one_hot_labels=one_hot,
      layers_list=layers_list,
      top_k=settings.top_k,
      dist_norm=settings.dist_norm,
      epsilon=settings.epsilon,
      layers_weights=[float(np.prod(h.shape[1:])) for h in layers_list],
      tape=tape,
  )
  for variable, value in zip(moving, saved):
    variable.assign(value)
  per_layer = [
      tf.reduce_mean(
          margin_penalty.distance_loss(d, settings.gamma, settings.alpha_factor)
      ).numpy()
      for d in distances
  ]
  by_id = {id(v): g for v, g in zip(model.trainable_variables, gradients)}
  report = {
      "logits": logits.numpy(),
      "difference_prob": differences.numpy()[:, 0],
      "dist": np.stack([d.numpy()[:, 0] for d in distances]),
      "margin_loss_per_layer": np.array(per_layer),
      "l2_loss": sum(
          float(np.sum(np.square(np.asarray(v, np.float64)))) / 2
          for v in model.trainable_variables
      ),
      "total_loss": float(total),
      "global_grad_norm": float(tf.linalg.global_norm(gradients)),
  }
  for role in TRAINABLE:
    report["grad/" + role] = by_id[id(_variable(model, role))].numpy()
  return report
