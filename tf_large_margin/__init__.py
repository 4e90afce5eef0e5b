"""tf_large_margin: large-margin training of deep networks for Keras 3 / TensorFlow.

Elsayed et al., "Large Margin Deep Networks for Classification", NeurIPS 2018.
"""

from tf_large_margin.losses import LargeMarginLoss
from tf_large_margin.margin import large_margin
from tf_large_margin.margin import large_margin_per_example
from tf_large_margin.margin import margin_distances
from tf_large_margin.models import MarginModel
from tf_large_margin.models import MarginTraining

__version__ = "0.1.0"
