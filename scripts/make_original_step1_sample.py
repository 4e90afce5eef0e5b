r"""Builds tests/data/original_step1.npz from the original code's golden trajectory.

  python scripts/make_original_step1_sample.py \
      --golden_dir=../shared/data/original_mnist_trajectory

What `tests/test_original_replay.py` needs to check step 1 of the original MNIST
recipe without the golden folder: the initial variables, the step-1 batch (uint8
pixels; the original feeds float32(pixel) / 255) and what the original computed in
step 1 (logits, distances, losses, gradients) and after it (variables, rms slots,
batch-norm statistics). Of the 1.6M-entry fc0 kernel only the initial value is
stored whole; its step-1 gradient, updated value and rms slot are stored at a fixed
random sample of entries (keys ending in "@sample", flat indices in
"fc0_kernel_sample_index"), which keeps the file near 7 MB.
"""

import os

from absl import app
from absl import flags
import numpy as np

flags.DEFINE_string(
    "golden_dir", "../shared/data/original_mnist_trajectory", "Golden trajectory."
)
flags.DEFINE_string(
    "output",
    os.path.join(os.path.dirname(__file__), "..", "tests", "data", "original_step1.npz"),
    "Output file.",
)
FLAGS = flags.FLAGS

SAMPLE = 20000  # entries of the fc0 kernel's gradient / update / slot kept

TRACE_KEYS = (
    "step1/logits",
    "step1/difference_prob",
    "step1/gradnorm_over_weight",
    "step1/dist",
    "step1/labels",
)
TRACE_STEP1 = (
    "total_loss",
    "margin_loss_per_layer",
    "l2_loss",
    "global_grad_norm",
    "learning_rate",
)


def main(_):
  golden = lambda name: np.load(os.path.join(FLAGS.golden_dir, name))
  trace, init, step1 = golden("trace.npz"), golden("init_weights.npz"), golden(
      "weights_step1.npz"
  )
  pixels = np.rint(trace["step1/images"].astype(np.float64) * 255.0)
  images = pixels.astype(np.uint8)
  if not np.array_equal(
      images.astype(np.float32) / np.float32(255.0), trace["step1/images"]
  ):
    raise ValueError("step1/images is not float32(uint8 pixels) / 255.")
  arrays = {"images": images}
  arrays.update({"init/" + k: init[k] for k in init.files})
  arrays.update({"step1/after/" + k: step1[k] for k in step1.files if "momentum" not in k})
  arrays.update({k: trace[k] for k in TRACE_KEYS})
  arrays.update({"step1/" + k: trace[k][0] for k in TRACE_STEP1})
  arrays.update({k: trace[k] for k in trace.files if k.startswith("step1/grad/")})
  index = np.sort(
      np.random.default_rng(0).choice(init["fc0/kernel"].size, SAMPLE, replace=False)
  ).astype(np.int32)
  arrays["fc0_kernel_sample_index"] = index
  for key in [k for k in arrays if k.endswith("fc0/kernel") and not k.startswith("init/")]:
    arrays[key + "@sample"] = arrays.pop(key).ravel()[index]
  np.savez_compressed(FLAGS.output, **arrays)
  print(f"{FLAGS.output}: {os.path.getsize(FLAGS.output) / 1e6:.1f} MB")


if __name__ == "__main__":
  app.run(main)
