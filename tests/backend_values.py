"""The output-layer losses' values and gradients under one Keras backend, in float64.

Run by tests/test_backends.py once per backend, in a fresh process (the backend is
chosen before Keras loads):

  KERAS_BACKEND=tensorflow|jax|torch python tests/backend_values.py OUT.npz

Every case is a function of float64 arrays returning a [batch] (or [batch, ...])
tensor v; the script saves v and the gradients of sum(v * r) (r fixed random
weights, so every entry of v matters) w.r.t. each array, computed by the backend's
own differentiation (tf.GradientTape, jax.grad, torch.autograd), and the message
of the error that a TensorFlow-only part (`JacobianModel`) raises. Under JAX and
PyTorch TensorFlow is made unimportable first: the package and these losses must
not need it.
"""

import sys

import numpy as np

from backend_subprocess import BACKEND  # first: before Keras

# pylint: disable=wrong-import-position
import keras
from keras import ops

import tf_large_margin as tlm

RNG = np.random.default_rng(0)
BATCH, CLASSES = 12, 5


def value_and_gradients(fn, arrays):
  """``(fn(*arrays), [d sum(fn * r) / d a for a in arrays])`` as numpy arrays."""
  weights = None

  def weighted_sum(*tensors):
    nonlocal weights
    value = fn(*tensors)
    if weights is None:
      weights = np.random.default_rng(1).normal(size=tuple(value.shape))
    return value, ops.sum(value * ops.convert_to_tensor(weights, value.dtype))

  if BACKEND == "tensorflow":
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    tensors = [tf.constant(a) for a in arrays]
    with tf.GradientTape() as tape:
      tape.watch(tensors)
      value, total = weighted_sum(*tensors)
    grads = tape.gradient(total, tensors)
  elif BACKEND == "jax":
    import jax  # pylint: disable=import-outside-toplevel

    (_, value), grads = jax.value_and_grad(
        lambda *t: weighted_sum(*t)[::-1], argnums=tuple(range(len(arrays))),
        has_aux=True,
    )(*[jax.numpy.asarray(a) for a in arrays])
  else:
    import torch  # pylint: disable=import-outside-toplevel

    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    value, total = weighted_sum(*tensors)
    total.backward()
    grads = [t.grad for t in tensors]
  return ops.convert_to_numpy(value), [ops.convert_to_numpy(g) for g in grads]


def logits(ties):
  """[BATCH, CLASSES] logits; with ``ties``, rows 0-2 have ties among the other
  classes (labels 0): who the top-k competitors are then follows the tie rule."""
  z = RNG.normal(size=(BATCH, CLASSES)) * 2.0
  if ties:
    z[0] = 1.0  # all equal
    z[1, 1:4] = 0.5  # three equal competitors
    z[2, [0, 2, 4]] = -1.0
  return z


def cosines():
  """cos(theta) in [-1, 1], including the ends and ArcFace's switch point."""
  c = RNG.uniform(-1.0, 1.0, size=(BATCH, CLASSES))
  c[0, 0], c[1, 1], c[2, 0] = 1.0, -1.0, np.cos(np.pi - 0.5) - 1e-3
  return c


LABELS = RNG.integers(0, CLASSES, size=BATCH)
LABELS[:3] = [0, 0, 0]

# Tied competitors have equal distances, and the worst case (their minimum) then
# picks one by rounding, which differs between backends (norms summed in another
# order): tied logits go only to the cases with top_k = 1 or the sum over the top k.
LARGE_MARGIN = {
    "default": {},
    "top2_inf": dict(top_k=2, dist_norm=np.inf),
    "top3_l1_sum": dict(top_k=3, dist_norm=1, worst_case_loss=False),
    "logits_top2_sum": dict(
        score="logits", top_k=2, use_approximation=False, worst_case_loss=False
    ),
    "no_approximation": dict(use_approximation=False, top_k=2),
    "identity_xent": dict(shrinkage="identity", cross_entropy_weight=0.5),
    "min": dict(aggregation="min", top_k=2),
    "smallest3_correct": dict(aggregation=3, correct_only=True),
    "probabilities_in": dict(from_logits=False, top_k=2),
}


def cases():
  """name -> (function of the arrays, arrays)."""
  z, z_ties, c = logits(ties=False), logits(ties=True), cosines()
  found = {}
  for name, kwargs in LARGE_MARGIN.items():
    loss = tlm.LargeMarginLoss(gamma=0.3, alpha_factor=4.0, reduction=None, **kwargs)
    inputs = z_ties if loss.top_k == 1 or not loss.worst_case_loss else z
    if not loss.from_logits:
      inputs = np.exp(inputs) / np.exp(inputs).sum(1, keepdims=True)
    found[f"LargeMarginLoss/{name}"] = (lambda p, loss=loss: loss(LABELS, p), [inputs])
  for variant in ("crammer_singer", "weston_watkins"):
    loss = tlm.MulticlassHinge(variant, cross_entropy_weight=0.2, reduction=None)
    found[f"MulticlassHinge/{variant}"] = (
        lambda p, loss=loss: loss(LABELS, p),
        [z_ties],
    )
  one_hot = np.eye(CLASSES)[LABELS]
  for name, loss in {
      "AMSoftmax": tlm.AMSoftmax(reduction=None),
      "ArcFace": tlm.ArcFace(margin=0.5, scale=16.0, reduction=None),
  }.items():
    found[name] = (lambda p, loss=loss: loss(one_hot, p), [c])
  norms = RNG.uniform(0.5, 3.0, size=(BATCH, CLASSES))
  head_output = np.concatenate([c, norms], axis=1)
  for name, loss in {
      "LSoftmax/m2": tlm.LSoftmax(m=2, reduction=None),
      "LSoftmax/m3_lambda10": tlm.LSoftmax(m=3, lambda_=10.0, reduction=None),
      "SphereFace/m4": tlm.SphereFace(m=4, reduction=None),
  }.items():
    found[name] = (lambda p, loss=loss: loss(LABELS[:, None], p), [head_output])
  scheduled = tlm.SphereFace(m=4, lambda_=tlm.LambdaDecay(), reduction=None)
  scheduled.step.assign(100)
  found["SphereFace/LambdaDecay_step100"] = (
      lambda p: scheduled(LABELS, p),
      [head_output],
  )
  x = RNG.normal(size=(BATCH, 4))
  kernel = RNG.normal(size=(4, CLASSES))
  for name, kwargs in {
      "cosine": {},
      "sphereface": dict(normalize_features=False, return_norms=True),
      "lsoftmax": dict(
          normalize_features=False, normalize_weights=False, return_norms=True
      ),
  }.items():
    head = tlm.CosineHead(CLASSES, **kwargs)
    head.build((None, 4))
    found[f"CosineHead/{name}"] = (
        lambda x, k, head=head: head.stateless_call([k], [], x)[0],
        [x, kernel],
    )
  steps = np.array([0.0, 1.0, 100.0, 1e4])
  found["LambdaDecay"] = (lambda s: tlm.LambdaDecay()(s), [steps])
  return found


def missing_part_error():
  """The message of ``tlm.JacobianModel`` (TensorFlow-only) under this backend."""
  try:
    getattr(tlm, "JacobianModel")
  except AttributeError as error:
    return str(error)
  return ""


def main(out):
  results = {"error/JacobianModel": np.array(missing_part_error())}
  for name, (fn, arrays) in cases().items():
    value, grads = value_and_gradients(fn, arrays)
    results[f"{name}/value"] = value
    for i, grad in enumerate(grads):
      results[f"{name}/grad{i}"] = grad
  np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1])
