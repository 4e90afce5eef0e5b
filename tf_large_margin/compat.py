"""The Keras internals the library relies on, fenced into this one module.

Everything else uses public Keras / TensorFlow API. Each private name below has no
public equivalent (checked with TensorFlow 2.21 / Keras 3.15) and carries a comment
saying why it is needed; `tests/test_compat.py` fails, naming the Keras version,
when Keras renames or removes one of them.

Multi-worker `fit` (keras-team/keras issue 20585). Keras 3's own `fit` fails under
`tf.distribute.MultiWorkerMirroredStrategy`:

1. Before the first step the trainer builds the model from a batch it gets by
   `strategy.reduce("MEAN", per_replica_batch)`, which cannot convert a multi-worker
   PerReplica value. Building from the local replica's batch is enough: only the
   shapes matter (`MultiWorkerFit`).
2. The scalar logs returned by `train_step` are reduced across workers with
   `strategy.reduce("MEAN", value, axis=0)`: "Invalid reduction dimension 0" for a
   scalar. Logs of shape [1] reduce to the same mean (`logs_for_reduction`).

The models of this library use both; drop them once Keras fixes the issue.

Metric direction. Callbacks monitoring a metric in mode "auto" (`EarlyStopping`,
`ModelCheckpoint`, `ReduceLROnPlateau`) read whether it improves upwards from the
metric's private ``_direction`` (`set_metric_direction`).

The multi-worker pieces are TensorFlow's; they import it when called, so that the
module (and `tf_large_margin.layers`, which sets a metric's direction) loads under
any Keras backend.
"""

# The private names used below (tests/test_compat.py checks each of them).
PRIVATE_NAMES = (
    "keras.Model._maybe_symbolic_build",
    "keras.Model._distribute_strategy",
    "keras.metrics.Metric._direction",
)


class MultiWorkerFit:
  """Mixin for a `keras.Model`: builds from the local replica's first batch.

  Overrides `_maybe_symbolic_build(iterator, data_batch)`, the private hook the
  TensorFlow trainer's `fit` / `evaluate` call before the first step (no public
  hook runs there). ``_distribute_strategy`` is the strategy the model was created
  under, None outside a strategy scope, where Keras skips this build: the public
  ``distribute_strategy`` returns the default strategy then, so it cannot tell
  the two cases apart, and taking a batch when Keras does not would change what
  the data pipeline yields.
  """

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = self._distribute_strategy
    if iterator is not None and strategy is not None:
      for _, _, batches in iterator:
        with strategy.scope():
          data_batch = local_batch(next(batches))
        break
      iterator = None
    super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def local_batch(batch):
  """The first local replica's part of a (possibly distributed) batch structure."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def local(value):
    if isinstance(value, tf.distribute.DistributedValues):
      return tf.distribute.get_strategy().experimental_local_results(value)[0]
    return value

  return tf.nest.map_structure(local, batch)


def multi_worker(strategy):
  """Whether ``strategy`` is a `MultiWorkerMirroredStrategy` over several workers.

  Keras reduces the logs with ``axis=0`` exactly then (its private
  ``_collective_all_reduce_multi_worker``); this asks the same with public API:
  the chief and worker tasks of the strategy's cluster.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return False
  cluster = strategy.cluster_resolver.cluster_spec()
  return sum(cluster.num_tasks(j) for j in ("chief", "worker") if j in cluster.jobs) > 1


def logs_for_reduction(logs):
  """Scalar logs as shape [1] under multi-worker training, unchanged otherwise."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  if not multi_worker(tf.distribute.get_strategy()):
    return logs
  return tf.nest.map_structure(lambda v: tf.reshape(v, [1]), logs)


def set_metric_direction(metric, direction):
  """Tells the callbacks' mode "auto" that ``metric`` improves "up" or "down".

  Keras' own metrics set the private ``_direction``; there is no public setter.
  """
  if direction not in ("up", "down"):
    raise ValueError(f'direction must be "up" or "down"; got {direction!r}.')
  metric._direction = direction  # pylint: disable=protected-access
