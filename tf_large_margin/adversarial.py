"""Adversarial training that composes with the large-margin loss.

Each training batch (x, y) is replaced by the clean examples followed by adversarial
versions of them crafted on the current model,

    ([x; x_adv], [y; y]),  x_adv = attack(model, x, y)  (no gradient through x_adv),

so the loss (the compiled loss, and a `MarginModel`'s margin term at its
``margin_layers``) is the mean of its values on the clean and the adversarial
examples: Goodfellow et al.'s
adversarial objective with alpha = 1/2 ("Explaining and Harnessing Adversarial
Examples", ICLR 2015), with FGSM, iterative FGSM or PGD (Madry et al. 2018) as the
attack. Elsayed et al. 2018 compare and combine the margin loss with it.

`AdversarialTraining` is a mixin for any Keras model class with a ``train_step``
(``class Net(AdversarialTraining, MarginTraining, keras.Model)``);
`AdversarialMarginModel` is the functional `MarginModel` with it. Evaluation
(``test_step``) stays on clean data.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import argument_checks
from tf_large_margin import attacks
from tf_large_margin.models import INPUT
from tf_large_margin.models import MarginModel

TRAINING_ATTACKS = ("fgsm", "iterative_fgsm", "pgd")


def class_ids(y):
  """Integer class ids [batch] from integer labels ([batch] or [batch, 1]) or one-hot
  labels [batch, classes]."""
  y = tf.convert_to_tensor(y)
  if y.shape.rank == 2 and y.shape[-1] != 1:
    return tf.argmax(y, axis=-1, output_type=tf.int32)
  return tf.cast(tf.reshape(y, [-1]), tf.int32)


class AdversarialTraining:
  """Mixin: each training batch also holds adversarial versions of its examples.

  Args:
    attack: "fgsm", "iterative_fgsm" or "pgd" (see `tf_large_margin.attacks`).
    epsilon: radius of the attack, > 0, in the input's units.
    norm: np.inf or 2 (2 only with "pgd").
    steps, step_size: of the iterative attacks (step_size default 2.5 epsilon / steps).
    clip_min, clip_max: the data range the examples stay in.
    seed: integer; PGD's random start at training step t uses the seed (seed, t).
  """

  def __init__(
      self,
      *args,
      attack="fgsm",
      epsilon=0.1,
      norm=np.inf,
      steps=10,
      step_size=None,
      clip_min=0.0,
      clip_max=1.0,
      seed=0,
      **kwargs,
  ):
    super().__init__(*args, **kwargs)
    self.configure_attack(
        attack=attack,
        epsilon=epsilon,
        norm=norm,
        steps=steps,
        step_size=step_size,
        clip_min=clip_min,
        clip_max=clip_max,
        seed=seed,
    )

  def configure_attack(
      self,
      attack="fgsm",
      epsilon=0.1,
      norm=np.inf,
      steps=10,
      step_size=None,
      clip_min=0.0,
      clip_max=1.0,
      seed=0,
  ):
    """Validates and sets the attack's settings (arguments as the class)."""
    if attack not in TRAINING_ATTACKS:
      raise ValueError(f"attack must be one of {TRAINING_ATTACKS}; got {attack!r}.")
    epsilon = argument_checks.check_nonnegative("epsilon", epsilon)
    if epsilon == 0:
      raise ValueError("epsilon must be > 0 for adversarial training; got 0.")
    attacks.check_attack_norm(norm)
    if norm != np.inf and attack != "pgd":
      raise ValueError(f"{attack} is an l_inf attack; norm=2 needs attack='pgd'.")
    steps = argument_checks.check_steps(steps)
    if step_size is not None:
      step_size = argument_checks.check_nonnegative("step_size", step_size)
    argument_checks.check_clip_range(clip_min, clip_max)
    self.attack_config = dict(
        attack=attack,
        epsilon=epsilon,
        norm=float(norm) if norm == np.inf else 2,
        steps=steps,
        step_size=step_size,
        clip_min=float(clip_min),
        clip_max=float(clip_max),
        seed=int(seed),
    )

  def adversarial_examples(self, x, y):
    """The attack's examples for the batch (x, y) on the current weights (graph
    code; ``x`` must lie in [clip_min, clip_max])."""
    config = self.attack_config
    x = tf.convert_to_tensor(x)
    labels = class_ids(y)

    def constant(value):
      return tf.constant(value, x.dtype)

    if config["attack"] == "fgsm":
      return attacks.fgsm_graph(
          self,
          x,
          labels,
          constant(config["epsilon"]),
          constant(config["clip_min"]),
          constant(config["clip_max"]),
      )
    step_size = config["step_size"]
    if step_size is None:
      step_size = attacks.default_step_size(config["epsilon"], config["steps"])
    iteration = tf.cast(self.optimizer.iterations, tf.int32)
    return attacks.pgd_graph(
        self,
        x,
        labels,
        constant(config["epsilon"]),
        constant(step_size),
        tf.constant(config["steps"]),
        config["norm"],
        config["attack"] == "pgd",
        tf.stack([tf.constant(config["seed"]), iteration]),
        constant(config["clip_min"]),
        constant(config["clip_max"]),
    )

  def adversarial_batch(self, data):
    """``([x; x_adv], [y; y], [w; w])`` for a batch ``(x, y[, sample_weight w])``."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    x_adv = tf.stop_gradient(self.adversarial_examples(x, y))
    if sample_weight is not None:
      sample_weight = tf.concat([sample_weight, sample_weight], axis=0)
    return tf.concat([x, x_adv], axis=0), tf.concat([y, y], axis=0), sample_weight

  def train_step(self, data):
    return super().train_step(self.adversarial_batch(data))

  def get_config(self):
    config = super().get_config()
    config.update(self.attack_config)
    return config


@keras.saving.register_keras_serializable(package="tf_large_margin")
class AdversarialMarginModel(AdversarialTraining, MarginModel):
  """`MarginModel` trained on clean and adversarial examples (see the module).

  With ``margin=LayerMargin(...)`` it combines the margin at ``margin_layers`` with
  adversarial training; with ``margin=None`` it is plain adversarial training of
  the compiled loss.

  >>> inputs = keras.Input((784,))
  >>> logits = keras.layers.Dense(10)(keras.layers.Dense(64, activation="relu")(inputs))
  >>> model = AdversarialMarginModel(inputs, logits, margin=tlm.LayerMargin(gamma=1.),
  ...                                margin_layers=["input"], attack="pgd",
  ...                                epsilon=0.3, steps=10)
  >>> model.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(
  ...     from_logits=True))

  Args:
    attack, epsilon, norm, steps, step_size, clip_min, clip_max, seed: as
      `AdversarialTraining`.
    margin, margin_layers, layers_weights, *args, **kwargs: as `MarginModel`.
  """

  @classmethod
  def from_model(
      cls,
      model,
      margin_layers=(INPUT,),
      layers_weights=None,
      margin=None,
      **attack_kwargs,
  ):
    """Wraps a functional or Sequential model (layers shared); ``attack_kwargs`` as
    `AdversarialTraining`."""
    wrapped = super().from_model(
        model, margin_layers=margin_layers, layers_weights=layers_weights, margin=margin
    )
    wrapped.configure_attack(**attack_kwargs)
    return wrapped
