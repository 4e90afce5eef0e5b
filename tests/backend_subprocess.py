"""The setup of a test subprocess that runs under one Keras backend in float64.

Imported first by the scripts the backend tests run in fresh processes
(`backend_values.py`, `margin_model_values.py`), before Keras: under JAX and
PyTorch any import of TensorFlow fails (the package must not need it there), JAX
computes in float64 (``JAX_ENABLE_X64``), and Keras' float type is float64.
"""

import os
import sys

BACKEND = os.environ["KERAS_BACKEND"]
if BACKEND != "tensorflow":
  sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
if BACKEND == "jax":
  os.environ["JAX_ENABLE_X64"] = "1"

# pylint: disable=wrong-import-position
import keras

keras.config.set_floatx("float64")
