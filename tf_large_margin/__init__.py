"""tf_large_margin: large-margin training of deep networks for Keras 3 / TensorFlow.

Elsayed et al., "Large Margin Deep Networks for Classification", NeurIPS 2018, and
related margin methods. Importing the package registers every class a saved model
may refer to.

Backends: under any Keras backend (TensorFlow, JAX, PyTorch) the package loads the
losses of the output layer (`LargeMarginLoss`, the hinge, additive and
multiplicative margin losses), `CosineHead`, the lambda schedule and the networks
(`architectures`, `convolution`, `normalization`); `MarginModel` (`models`) loads
under TensorFlow and JAX; the other parts need TensorFlow and load only under its
backend. Submodules, by concept:

Training with the large-margin loss (Eq. 10)
  `margin_loss`       Eq. 10 as functions: `large_margin`, `margin_distances`
  `margin_scores`     Eq. 10's numerators: probability (paper) or logit differences
  `margin_penalty`    shrinkage (clip / identity) and batch aggregation of Eq. 10
  `losses`            `LargeMarginLoss` (Eq. 10 at the logits, a Keras loss) and
                      `LayerMargin` (Eq. 10 at a model's layers, a model setting)
  `models`            `MarginModel`: Eq. 10 at the input and hidden layers in `fit`
  `perturbed_forward` under JAX: the gradients at a model's layers by `jax.vjp`
  `jax_step`          under JAX: the stateless training step of Keras' JAX trainer
  `jacobian`          `JacobianModel`: Sokolic et al.'s Jacobian regulariser
  `adversarial`       adversarial training (FGSM / iterative FGSM / PGD examples)
Output-space margin losses
  `hinge_loss`        multi-class hinge (Crammer-Singer, Weston-Watkins)
  `additive_margin_losses`        AM-Softmax / CosFace, ArcFace
  `multiplicative_margin_losses`  L-Softmax, A-Softmax (SphereFace)
  `layers`            `CosineHead`, the cosine classifier these losses need
  `schedules`, `callbacks`        `LambdaDecay` and the `LambdaScheduler` callback
Measuring margins and robustness
  `margin_estimation` first-order, linearised and DeepFool margins; summaries
  `directional_margins` distance and alignment along given (transferred) directions
  `certified`         certified margin lower bounds (interval and CROWN bounds),
                      built on `bound_operations`, `bound_network`, `bound_propagation`
  `attacks`           FGSM, iterative FGSM, PGD (cross-entropy or logit-margin);
                      `norm_balls`: steepest ascent and projection in l_2 / l_inf balls
  `monitor`           `MarginMonitor`, a callback logging margin distributions
Data, networks and the original recipe
  `datasets` (file formats in `dataset_files`), `architectures`, `convolution`
  (`DepthwiseGradientConv2D`: a fast input gradient for the margin at the input),
  `normalization` (TF1 batch norm), `optimizers` (TF1 RMSProp), `regularizers` (TF1 weight decay),
  `original_recipe` (the original MNIST training recipe); `compat` fences the few
  Keras internals the package needs
"""

import keras

from tf_large_margin import additive_margin_losses
from tf_large_margin import architectures
from tf_large_margin import callbacks
from tf_large_margin import convolution
from tf_large_margin import hinge_loss
from tf_large_margin import layers
from tf_large_margin import losses
from tf_large_margin import margin_loss
from tf_large_margin import margin_penalty
from tf_large_margin import margin_scores
from tf_large_margin import multiplicative_margin_losses
from tf_large_margin import normalization
from tf_large_margin import schedules
from tf_large_margin.additive_margin_losses import AMSoftmax
from tf_large_margin.additive_margin_losses import ArcFace
from tf_large_margin.additive_margin_losses import CosFace
from tf_large_margin.callbacks import LambdaScheduler
from tf_large_margin.convolution import DepthwiseGradientConv2D
from tf_large_margin.hinge_loss import MulticlassHinge
from tf_large_margin.layers import CosineHead
from tf_large_margin.losses import LargeMarginLoss
from tf_large_margin.losses import LayerMargin
from tf_large_margin.margin_loss import large_margin
from tf_large_margin.margin_loss import large_margin_per_example
from tf_large_margin.margin_loss import margin_distances
from tf_large_margin.multiplicative_margin_losses import LSoftmax
from tf_large_margin.multiplicative_margin_losses import SphereFace
from tf_large_margin.schedules import LambdaDecay

if keras.backend.backend() == "tensorflow":
  # The parts that need TensorFlow (tapes, tf.data, tf.distribute): loaded only
  # under its backend; `__getattr__` names the backend they need otherwise.
  from tf_large_margin import adversarial
  from tf_large_margin import attacks
  from tf_large_margin import certified
  from tf_large_margin import datasets
  from tf_large_margin import directional_margins
  from tf_large_margin import jacobian
  from tf_large_margin import margin_estimation
  from tf_large_margin import monitor
  from tf_large_margin import optimizers
  from tf_large_margin import original_recipe
  from tf_large_margin import regularizers
  from tf_large_margin.jacobian import JacobianModel
  from tf_large_margin.monitor import MarginMonitor
if keras.backend.backend() in ("tensorflow", "jax"):
  # MarginModel: the gradients at layers from a tape (TensorFlow) or jax.vjp.
  from tf_large_margin import models
  from tf_large_margin.models import MarginModel
  from tf_large_margin.models import MarginTraining


def __getattr__(name):
  """A clear error for the TensorFlow-only parts under another Keras backend."""
  if name.startswith("_") or keras.backend.backend() == "tensorflow":
    raise AttributeError(f"module 'tf_large_margin' has no attribute {name!r}")
  raise AttributeError(
      f"tf_large_margin.{name} is not loaded under the Keras backend "
      f'"{keras.backend.backend()}": it needs the TensorFlow backend '
      "(KERAS_BACKEND=tensorflow). Under JAX and PyTorch the package has the "
      "losses of the output layer (LargeMarginLoss, MulticlassHinge, AMSoftmax / "
      "CosFace, ArcFace, LSoftmax, SphereFace), CosineHead, LambdaDecay and "
      "LambdaScheduler; under JAX also MarginModel and MarginTraining (functional "
      "models); see the README's backend table."
  )


__version__ = "0.1.0"
