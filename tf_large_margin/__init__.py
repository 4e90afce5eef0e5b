"""tf_large_margin: large-margin training of deep networks for Keras 3 / TensorFlow."""
