"""The numerators of Eq. 10 and their cotangents: probability or logit differences.

Eq. 10 of Elsayed et al. 2018 divides a score difference between the label y and a
competing class j by the norm of its gradient at a layer h. The difference is the
*score*; its derivative w.r.t. the logits z (the cotangent c_j) is all a backward
pass needs to give grad_h at every layer at once:

* ``score="probabilities"`` (the paper and the original code): p = softmax(z),

      numerator p_y - p_(j),   c_j = J_softmax (e_y - w_j),  J = diag(p) - p p^T;

* ``score="logits"`` (beyond the paper):

      numerator z_y - z_(j),   c_j = e_y - w_j,

where w_j selects the j-th most probable other class (split among ties for top_k =
1, as TensorFlow's ``reduce_max`` gradient). The probability distance grows without
bound once the softmax saturates (its numerator stays below 1 while its gradient
vanishes); the logit distance is the exact distance of a linear model.
"""

from keras import ops
from keras.backend import standardize_dtype
import numpy as np

SCORES = ("probabilities", "logits")


def check_score(score):
  """Returns ``score`` after checking it is "probabilities" or "logits"."""
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}; got {score!r}.")
  return score


def top_competitors(others, top_k):
  """The ``top_k`` largest entries of each row of ``others`` and who they are.

  ``top_k`` = 1: the row maximum, its weight shared equally by tied entries
  (``reduce_max``'s gradient in TensorFlow), w = [others == max] / (number tied).
  ``top_k`` > 1: the columns in descending order, ties lowest index first (as
  ``tf.math.top_k``) on every backend: a stable argsort of -others; w_j is the
  one-hot row of the j-th column.

  Returns:
    ``(values, competitors)``: [batch, top_k] values and [batch, top_k, classes]
    weights w_j with values[:, j] = sum_i w_j,i others_i.
  """
  if top_k == 1:
    # initial: an empty batch stays empty (keras.ops.max raises in eager TF).
    values = ops.max(others, axis=1, keepdims=True, initial=-np.inf)
    tied = ops.cast(ops.equal(others, values), others.dtype)
    return values, (tied / ops.sum(tied, axis=1, keepdims=True))[:, None, :]
  indices = ops.argsort(-others, axis=1)[:, :top_k]
  values = ops.take_along_axis(others, indices, axis=1)
  return values, ops.one_hot(indices, others.shape[1], dtype=others.dtype)


def top_k_probability_differences(probs, one_hot_labels, top_k):
  """p_y - p_(j) for the k most probable other classes, and who the competitors are.

  As the original: the other classes' probabilities are ``p * (1 - one_hot)``;
  for ``top_k`` = 1 the competitor is their ``reduce_max``, for ``top_k`` > 1 the
  columns of ``tf.math.top_k`` (`top_competitors`). The returned competitor weights
  w_j are what the derivative of p_(j) w.r.t. those masked probabilities is in
  TensorFlow:

  - top_k = 1: the max's gradient is shared equally by tied entries,
    w = [p_i (1 - y_i) == max] / (number of tied entries) (with all other
    probabilities 0, the label's own masked 0 counts as tied, as in TF);
  - top_k > 1: one-hot of the j-th index (ties: lowest index first).

  Args:
    probs: [batch, classes] softmax probabilities.
    one_hot_labels: [batch, classes] one-hot labels (same dtype as ``probs``).
    top_k: number of competing classes.

  Returns:
    ``(differences, competitors)``: [batch, top_k] p_y - p_(j), and [batch, top_k,
    classes] weights w_j with p_(j) = sum_i w_j,i p_i (1 - y_i).
  """
  correct_prob = ops.sum(probs * one_hot_labels, axis=1, keepdims=True)
  top_probs, competitors = top_competitors(probs * (1.0 - one_hot_labels), top_k)
  return correct_prob - top_probs, competitors


def probability_difference_cotangents(probs, one_hot_labels, competitors):
  """d(p_y - p_(j)) / d logits for each competitor j.

  With p_y = sum(p * one_hot) and p_(j) = sum_i w_j,i p_i (1 - y_i) (the weights of
  `top_k_probability_differences`), the derivative w.r.t. the logits is J v_j with
  J = diag(p) - p p^T the softmax Jacobian and v_j = one_hot - w_j * (1 - one_hot).

  Returns:
    A list of ``competitors.shape[1]`` tensors of shape [batch, classes].
  """
  cotangents = []
  for j in range(competitors.shape[1]):
    v = one_hot_labels - competitors[:, j] * (1.0 - one_hot_labels)
    cotangents.append(probs * v - probs * ops.sum(probs * v, axis=1, keepdims=True))
  return cotangents


def top_k_logit_differences(logits, one_hot_labels, top_k):
  """z_y - z_(j) for the k largest other logits, and who the competitors are.

  As `top_k_probability_differences` with the logits as the score: the label's
  own logit is excluded (set to the lowest value of the dtype), ``top_k`` = 1 takes
  ``reduce_max`` (ties share the weight equally, as its gradient) and ``top_k`` > 1
  the columns in descending order (`top_competitors`). Softmax is monotonic, so the
  competitors are those of the probabilities (up to ties).

  Returns:
    ``(differences, competitors)``: [batch, top_k] z_y - z_(j) and [batch, top_k,
    classes] weights w_j with z_(j) = sum_i w_j,i z_i.
  """
  correct_logit = ops.sum(logits * one_hot_labels, axis=1, keepdims=True)
  lowest = ops.full_like(logits, np.finfo(standardize_dtype(logits.dtype)).min)
  other_logits = ops.where(one_hot_labels > 0, lowest, logits)
  top_logits, competitors = top_competitors(other_logits, top_k)
  return correct_logit - top_logits, competitors


def score_differences(logits, one_hot_labels, top_k, score="probabilities"):
  """The numerators of Eq. 10 and their cotangents w.r.t. the logits.

  score "probabilities" (the paper, the original): p = softmax(logits), numerators
  p_y - p_(j) (`top_k_probability_differences`), cotangents J_softmax (e_y - w_j)
  (`probability_difference_cotangents`). score "logits": numerators z_y - z_(j)
  (`top_k_logit_differences`), cotangents e_y - w_j.

  Returns:
    ``(differences, cotangents)``: [batch, top_k] and a list of top_k [batch,
    classes] tensors, in the dtype of ``one_hot_labels``.
  """
  logits = ops.cast(logits, one_hot_labels.dtype)
  if check_score(score) == "logits":
    if logits.shape[1] is not None and top_k >= logits.shape[1]:
      raise ValueError(
          f'score="logits" needs top_k < classes ({logits.shape[1]}): the label '
          f"itself is no competitor; got top_k={top_k}."
      )
    differences, competitors = top_k_logit_differences(logits, one_hot_labels, top_k)
    cotangents = [
        one_hot_labels - competitors[:, j] for j in range(competitors.shape[1])
    ]
    return differences, cotangents
  probs = ops.softmax(logits, axis=-1)
  differences, competitors = top_k_probability_differences(probs, one_hot_labels, top_k)
  return differences, probability_difference_cotangents(
      probs, one_hot_labels, competitors
  )
