"""Workarounds that let `MarginModel.fit` run under MultiWorkerMirroredStrategy.

Keras 3's own `fit` fails under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras issue 20585; checked with TensorFlow 2.21 / Keras 3.15):

1. Before the first step the trainer builds the model from a batch it gets by
   `strategy.reduce("MEAN", per_replica_batch)`, which cannot convert a multi-worker
   PerReplica value. Building from the local replica's batch is enough: only the
   shapes matter (`MultiWorkerFit`).
2. The scalar logs returned by `train_step` are reduced across workers with
   `strategy.reduce("MEAN", value, axis=0)`: "Invalid reduction dimension 0" for a
   scalar. Logs of shape [1] reduce to the same mean (`logs_for_reduction`).

The models of this library use both; drop them once Keras fixes the issue.
"""

import tensorflow as tf
from keras.src.backend.tensorflow.trainer import _collective_all_reduce_multi_worker


class MultiWorkerFit:
  """Mixin for a `keras.Model`: builds from the local replica's first batch."""

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    if iterator is not None and self._distribute_strategy is not None:
      for _, _, batches in iterator:
        with self._distribute_strategy.scope():
          data_batch = local_batch(next(batches))
        break
      iterator = None
    super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def local_batch(batch):
  """The first local replica's part of a (possibly distributed) batch structure."""

  def local(value):
    if isinstance(value, tf.distribute.DistributedValues):
      return tf.distribute.get_strategy().experimental_local_results(value)[0]
    return value

  return tf.nest.map_structure(local, batch)


def logs_for_reduction(logs):
  """Scalar logs as shape [1] under multi-worker training, unchanged otherwise."""
  if not _collective_all_reduce_multi_worker(tf.distribute.get_strategy()):
    return logs
  return tf.nest.map_structure(lambda v: tf.reshape(v, [1]), logs)
