"""The --lambda_* flags of L-Softmax / SphereFace annealing, shared by the scripts.

The target logit is annealed as in the papers,
scale * (lambda cos(theta) + psi(theta)) / (1 + lambda), with
lambda = max(lambda_min, lambda_base * (1 + lambda_gamma * step)^(-lambda_power))
(`tf_large_margin.LambdaDecay`, advanced by a `tf_large_margin.LambdaScheduler`
callback); the defaults are SphereFace's.
"""

from absl import flags

import tf_large_margin as tlm

flags.DEFINE_float(
    "lambda_base",
    1000.0,
    "--loss=lsoftmax|sphereface: lambda at step 0 of the annealing "
    "max(lambda_min, lambda_base * (1 + lambda_gamma * step)^(-lambda_power)). "
    "0: constant lambda = --lambda_min (0 and 0: no annealing, the papers' loss "
    "proper).",
)
flags.DEFINE_float("lambda_gamma", 0.12, "Decay rate of lambda; see --lambda_base.")
flags.DEFINE_float("lambda_power", 1.0, "Decay power of lambda; see --lambda_base.")
flags.DEFINE_float("lambda_min", 5.0, "Floor of lambda; see --lambda_base.")
FLAGS = flags.FLAGS


def annealing_lambda():
  """``lambda_`` of L-Softmax / SphereFace from the flags: a `LambdaDecay`, or the
  constant --lambda_min when --lambda_base=0."""
  if FLAGS.lambda_base == 0:
    return FLAGS.lambda_min
  return tlm.LambdaDecay(
      FLAGS.lambda_base, FLAGS.lambda_gamma, FLAGS.lambda_power, FLAGS.lambda_min
  )
