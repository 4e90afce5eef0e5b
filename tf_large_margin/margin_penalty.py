"""How Eq. 10's distances become a loss, and how examples are weighted in the batch.

Shrinkage (the survey of Guo & Zhang, Eq. 6, generalises the original's clipping):

    clip:      loss_i = relu(gamma - max(d_i, gamma (1 - alpha_factor))) - gamma
    identity:  loss_i = relu(gamma - d_i) - gamma

`distance_loss` sums loss_i over the top-k competing classes (or takes the worst).
Aggregation over the batch: "mean" (the original's), "min" (only the smallest-margin
examples: an integer n keeps the n largest losses) and ``correct_only`` (only the
correctly classified examples), as weights that `aggregation_weights` returns.
"""

from keras import ops
import numpy as np


def _maximum_with_relu(a, b):
  """max(a, b) written as a + relu(b - a), with the original's gradient at a == b."""
  return a + ops.relu(b - a)


def clip_shrinkage(distances, gamma, alpha_factor):
  """The original's shrinkage r(d) = clip(d, gamma * (1 - alpha_factor), gamma).

  Returned as the loss -r(d) = relu(gamma - max(d, gamma (1 - alpha))) - gamma,
  written as the original does (the same value and gradient at the clip points).
  """
  lower = gamma * (1.0 - alpha_factor)
  loss = _maximum_with_relu(distances, lower)
  return -(_maximum_with_relu(0.0, gamma - loss) - gamma)


def identity_shrinkage(distances, gamma, alpha_factor):
  """r(d) = d: the distances themselves are maximised, unclipped."""
  del gamma, alpha_factor
  return distances


SHRINKAGES = {"clip": clip_shrinkage, "identity": identity_shrinkage}


def get_shrinkage(shrinkage):
  """A shrinkage r(distances, gamma, alpha_factor) from its name or a callable."""
  if callable(shrinkage):
    return shrinkage
  try:
    return SHRINKAGES[shrinkage]
  except (KeyError, TypeError):
    raise ValueError(
        f"shrinkage must be one of {sorted(SHRINKAGES)} or a callable "
        f"r(distances, gamma, alpha_factor); got {shrinkage!r}."
    ) from None


def smallest(distances):
  """The [batch, 1] minimum over the k distances of each example.

  ``initial=inf`` changes no value but keeps an empty batch empty: without it
  `keras.ops.min` raises on an empty tensor in eager TensorFlow.
  """
  return ops.min(distances, axis=1, keepdims=True, initial=np.inf)


def distance_loss(
    distances, gamma=10000.0, alpha_factor=2.0, worst_case_loss=True, shrinkage="clip"
):
  """Per-example loss -sum_j r(d_j) of the distances; the original's by default.

      loss = sum_j relu(gamma - max(d_j, gamma * (1 - alpha_factor))) - gamma

  (r = clip into [gamma (1 - alpha_factor), gamma], survey Eq. 6's shrinkage).

  Args:
    distances: [batch, k] signed distances to the boundaries.
    gamma: the desired margin.
    alpha_factor: distances below gamma * (1 - alpha_factor) are clipped.
    worst_case_loss: if True, only the smallest distance of each example counts.
    shrinkage: "clip" (the original), "identity" or a callable
      r(distances, gamma, alpha_factor) -> shrunk distances of the same shape.

  Returns:
    A [batch] tensor.
  """
  if worst_case_loss:
    distances = smallest(distances)
  return -ops.sum(
      get_shrinkage(shrinkage)(distances, gamma, alpha_factor), axis=1
  )


def active_fraction(distances, gamma, alpha_factor, worst_case_loss=True):
  """The fraction of examples whose clipped margin loss has a gradient.

  With the clip shrinkage, loss_j = relu(gamma - max(d_j, gamma (1 - alpha_factor)))
  - gamma depends on d_j only inside the open interval

      gamma (1 - alpha_factor) < d_j < gamma:

  above it the margin is already met, below it the example is clipped. A margin term
  active on 0 % of the examples does nothing.

  Args:
    distances: [batch, k] distances (e.g. `tf_large_margin.margin_distances`).
    gamma, alpha_factor, worst_case_loss: as `distance_loss`. With the worst case an
      example is active when its smallest distance is inside; otherwise when any
      of its k distances is.

  Returns:
    A scalar in [0, 1] (float32; 0 for an empty batch).
  """
  distances = ops.convert_to_tensor(distances)
  if worst_case_loss:
    distances = smallest(distances)
  lower = gamma * (1.0 - alpha_factor)
  inside = ops.any((distances > lower) & (distances < gamma), axis=1)
  count = ops.cast(ops.shape(distances)[0], "float32")
  return ops.where(count > 0, ops.sum(ops.cast(inside, "float32")) / count, 0.0)


AGGREGATIONS = ("mean", "min")


def check_aggregation(aggregation):
  """Raises ValueError unless ``aggregation`` is "mean", "min" or an integer >= 1."""
  if isinstance(aggregation, str):
    valid = aggregation in AGGREGATIONS
  else:
    valid = (
        isinstance(aggregation, (int, np.integer))
        and not isinstance(aggregation, bool)
        and aggregation >= 1
    )
  if not valid:
    raise ValueError(
        f"aggregation must be one of {AGGREGATIONS} or an integer >= 1; "
        f"got {aggregation!r}."
    )


def aggregation_weights(per_example_loss, correct=None, aggregation="mean"):
  """Per-example weights that turn the batch mean into another aggregation.

  The batch mean of ``weights * per_example_loss`` is, per survey Eq. 6's choices
  of how margins are aggregated over the set T of examples:
    - "mean": the mean over T (the original, with T = the batch);
    - "min": the loss at the smallest margin in T (the largest loss);
    - an integer n: the mean over the n smallest margins in T (largest losses).
  With ``correct`` (a [batch] bool mask), T is restricted to correctly classified
  examples. The weights carry no gradient. Among equal losses the lower index is
  chosen first (as ``tf.math.top_k``), on every Keras backend.
  """
  check_aggregation(aggregation)
  per_example_loss = ops.stop_gradient(per_example_loss)
  batch = ops.shape(per_example_loss)[0]
  in_set = (
      ops.ones_like(per_example_loss, "bool")
      if correct is None
      else ops.cast(correct, "bool")
  )
  if aggregation == "mean":
    chosen = ops.cast(in_set, per_example_loss.dtype)
  else:
    count = 1 if aggregation == "min" else aggregation
    count = ops.minimum(count, ops.sum(ops.cast(in_set, "int32")))
    ranked = ops.where(in_set, per_example_loss, -np.inf)
    # rank[i]: the position of example i in descending order (stable argsort).
    rank = ops.argsort(ops.argsort(-ranked))
    chosen = ops.cast(rank < count, per_example_loss.dtype)
  # 0 where the set is empty (no correctly classified example), not 0 / 0. Not
  # keras.ops.divide_no_nan: it returns float32 for float64 under PyTorch.
  size = ops.sum(chosen)
  weights = chosen * ops.cast(batch, chosen.dtype)
  return ops.where(size > 0, weights / ops.where(size > 0, size, 1.0), 0.0)
