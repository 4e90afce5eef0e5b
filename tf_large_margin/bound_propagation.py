"""Bounds of a network's output over a perturbation set: IBP and CROWN.

The network is a chain of `tf_large_margin.bound_operations` operations h_0 -> h_1
-> ... -> h_n (`tf_large_margin.bound_network`), the set an `InputSet` (an l_inf or
l_2 ball, intersected with a box). Three methods:

* "ibp", interval bound propagation (Gowal et al., "On the Effectiveness of Interval
  Bound Propagation for Training Verifiably Robust Models", 2018): the box of the
  input is pushed through each operation's interval rule. An l_2 ball is bounded
  exactly by the first affine map (the dual norm): W_o x' + b_o lies in W_o x + b_o
  +- eps ||W_o||_2 for every output unit o (reshapes keep the ball a ball).

* "crown-ibp" (CROWN-IBP, Zhang et al., ICLR 2020) and "crown" (Zhang et al.,
  NeurIPS 2018): a linear lower bound a . h_n of the output is propagated backwards
  through each operation's relaxation (its backward rule) and concretised on the
  input set, one pass with the rows [I; -I] giving the lower and upper bounds. The
  relaxations of the ReLU and max-pooling layers need bounds of their inputs: IBP's
  ("crown-ibp", one backward pass), or CROWN's own ("crown": one backward pass per
  unit that matters, i.e. per unstable ReLU input, or per unit of a max-pooling
  input). Every CROWN bound is intersected with the IBP bound, so it is never looser
  than IBP. Full CROWN costs a backward pass per unit: on the MNIST CNN of
  `architectures.mnist_cnn` (max-pooling after 28x28x32 ReLUs) minutes per bound,
  against a fraction of a second for IBP and CROWN-IBP.

The margin logits m_j = z_y - z_j are bounded by appending (or folding into the last
Dense layer) their affine map, `with_margin`.
"""

import math

import tensorflow as tf

from tf_large_margin import bound_operations
from tf_large_margin import norm_balls

IBP = "ibp"
CROWN = "crown"
CROWN_IBP = "crown-ibp"
METHODS = (IBP, CROWN_IBP, CROWN)
# Entries of the backward matrices per chunk of units in CROWN's intermediate bounds.
CHUNK_ENTRIES = 2**22


def ibp_step(operation, box, ball):
  """One layer of IBP: ``(box, ball)`` -> the bounds of the layer's output.

  ``ball`` is (center, eps) while the set is still an l_2 ball (the input, reshaped),
  else None. An affine map of the ball is bounded exactly per output unit,
  W_o c + b_o +- eps ||W_o||_2, and intersected with the interval bound.
  """
  out = operation.interval(box)
  if ball is None:
    return out, None
  center, epsilon = ball
  if operation.isometry:
    return out, (operation.apply(center), epsilon)
  norms = operation.row_norms()
  if norms is None:
    return out, None
  center = operation.apply(center)
  radius = norm_balls.expand_to(epsilon, center) * norms
  return out.intersect(bound_operations.Box(center - radius, center + radius)), None


def backward_bound(operations, boxes, a, inputs):
  """CROWN: a lower bound of a . h_n per row of a [batch, K, *out] -> [batch, K].

  ``operations`` map h_0 to h_n; ``boxes[i]`` bounds h_i (the input of operation
  i), used by the nonlinear relaxations.
  """
  c = tf.zeros(a.shape[:2], bound_operations.DTYPE)
  for operation, box in zip(operations[::-1], boxes[len(operations) - 1 :: -1]):
    a, c = operation.backward(a, c, box)
  return c + inputs.min_linear(a)


def unit_rows(shape, units, batch):
  """The rows e_u of the identity on the units of ``shape``, u in ``units`` (flat
  indices): [batch, len(units), *shape]."""
  rows = tf.one_hot(units, math.prod(shape), dtype=bound_operations.DTYPE)
  rows = tf.reshape(rows, [1, len(units)] + list(shape))
  return tf.tile(rows, [batch, 1] + [1] * len(shape))


def crown_units(operations, boxes, inputs, units):
  """CROWN bounds of the units ``units`` (flat indices) of h_n = operations(h_0):
  one backward pass per unit and sign, in chunks of units.

  Returns:
    ``(lower, upper)``, each [batch, len(units)].
  """
  shape = operations[-1].out_shape
  batch, count = inputs.x.shape[0], int(units.shape[0])
  widest = max(math.prod(op.in_shape) for op in operations)
  chunk = max(1, CHUNK_ENTRIES // (2 * batch * max(widest, math.prod(shape))))
  lowers, uppers = [], []
  for start in range(0, count, chunk):
    rows = unit_rows(shape, units[start : start + chunk], batch)
    bound = backward_bound(operations, boxes, tf.concat([rows, -rows], 1), inputs)
    lowers.append(bound[:, : rows.shape[1]])
    uppers.append(-bound[:, rows.shape[1] :])
  return tf.concat(lowers, 1), tf.concat(uppers, 1)


def units_to_refine(box, following):
  """Flat indices of the units of ``box`` whose bounds matter to the ``following``
  operations (the rest of the network).

  Before a ReLU, the units unstable (l < 0 < u) in some example: a stable unit's
  relaxation is exact whatever its bounds, unless the ReLU's output bounds feed a
  max-pooling (its relaxation uses them), as does a max-pooling directly: then all.
  """
  lower = tf.reshape(box.lower, [box.lower.shape[0], -1])
  relus = 0
  while relus < len(following) and isinstance(following[relus], bound_operations.ReLU):
    relus += 1
  if not relus or (relus < len(following) and following[relus].nonlinear):
    return tf.range(lower.shape[1])
  upper = tf.reshape(box.upper, [box.upper.shape[0], -1])
  unstable = tf.reduce_any((lower < 0.0) & (upper > 0.0), axis=0)
  return tf.cast(tf.where(unstable)[:, 0], tf.int32)


def refine(box, operations, boxes, inputs, following):
  """``box`` (of h_n = operations(h_0)) intersected with CROWN's bounds of the units
  that matter to the ``following`` operations (`units_to_refine`)."""
  units = units_to_refine(box, following)
  if units.shape[0] == 0:
    return box
  lower, upper = crown_units(operations, boxes, inputs, units)
  index = units[:, None]

  def update(bounds, refined, scatter):
    flat = tf.transpose(tf.reshape(bounds, [bounds.shape[0], -1]))  # [units, batch]
    flat = scatter(flat, index, tf.transpose(refined))
    return tf.reshape(tf.transpose(flat), bounds.shape)

  return bound_operations.Box(
      update(box.lower, lower, tf.tensor_scatter_nd_max),
      update(box.upper, upper, tf.tensor_scatter_nd_min),
  )


def activation_boxes(operations, inputs, intermediate=IBP):
  """Bounds of every activation h_0 (the input), ..., h_n (the output): IBP,
  intersected with CROWN's own bounds at the inputs of nonlinear operations when
  ``intermediate`` is "crown".

  Only the units that matter are refined (`units_to_refine`), and the output of a
  ReLU is not: relu of its input's CROWN bounds already is its CROWN bound.
  """
  box = inputs.box
  ball = (inputs.x, inputs.epsilon) if inputs.norm == 2 else None
  boxes = [box]
  for i, operation in enumerate(operations):
    box, ball = ibp_step(operation, box, ball)
    if (
        intermediate == CROWN
        and i + 1 < len(operations)
        and operations[i + 1].nonlinear
        and not isinstance(operation, bound_operations.ReLU)
    ):
      box = refine(box, operations[: i + 1], boxes, inputs, operations[i + 1 :])
    boxes.append(box)
  return boxes


def output_bounds(operations, inputs, method):
  """Bounds of the network output h_n: IBP, or CROWN intersected with IBP.

  For CROWN, the rows [I; -I] give the lower bounds of h_n and of -h_n.
  """
  if method == IBP:
    return activation_boxes(operations, inputs)[-1]
  boxes = activation_boxes(operations, inputs, CROWN if method == CROWN else IBP)
  size = operations[-1].out_shape[0]
  rows = unit_rows((size,), tf.range(size), inputs.x.shape[0])
  bound = backward_bound(operations, boxes, tf.concat([rows, -rows], 1), inputs)
  return boxes[-1].intersect(bound_operations.Box(bound[:, :size], -bound[:, size:]))


def with_margin(operations, labels, num_classes):
  """``operations`` computing the margin logits z_y - z_j (`margin_operation`)."""
  margin, folded = bound_operations.margin_operation(
      operations[-1], labels, num_classes
  )
  return operations[:-1] + [margin] if folded else operations + [margin]
