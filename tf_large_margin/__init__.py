"""tf_large_margin: large-margin training of deep networks for Keras 3 / TensorFlow.

Elsayed et al., "Large Margin Deep Networks for Classification", NeurIPS 2018, and
related margin methods. Modules: `margin` (Eq. 10), `losses` (the Keras loss),
`models` (MarginModel), `jacobian` (Sokolic et al.'s regulariser), `output_margin`
(hinge and margin-softmax losses), `layers` (CosineHead), `datasets`,
`architectures` (the papers' networks), `normalization` (TF1 batch norm),
`optimizers` (TF1 RMSProp), `regularizers` (TF1 weight decay), `original_recipe`
(the original MNIST training recipe), `monitor` (MarginMonitor), `certified` (certified margin lower bounds),
`distribute`. Importing the package registers
every class a saved model may refer to.
"""

from tf_large_margin import architectures
from tf_large_margin import certified
from tf_large_margin import normalization
from tf_large_margin import optimizers
from tf_large_margin import original_recipe
from tf_large_margin import regularizers
from tf_large_margin.jacobian import JacobianModel
from tf_large_margin.layers import CosineHead
from tf_large_margin.losses import LargeMarginLoss
from tf_large_margin.margin_loss import large_margin
from tf_large_margin.margin_loss import large_margin_per_example
from tf_large_margin.margin_loss import margin_distances
from tf_large_margin.models import MarginModel
from tf_large_margin.models import MarginTraining
from tf_large_margin.monitor import MarginMonitor
from tf_large_margin.output_margin import AMSoftmax
from tf_large_margin.output_margin import ArcFace
from tf_large_margin.output_margin import CosFace
from tf_large_margin.output_margin import LambdaDecay
from tf_large_margin.output_margin import LambdaScheduler
from tf_large_margin.output_margin import LSoftmax
from tf_large_margin.output_margin import MulticlassHinge
from tf_large_margin.output_margin import SphereFace

__version__ = "0.1.0"
