"""Quiet TensorFlow's C++ start-up logging in test output (set before TF loads)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
