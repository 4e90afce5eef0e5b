"""Trains a small MarginModel a few steps under a strategy; saves the final weights.

Run by tests/test_distribute.py in fresh processes (logical devices and TF_CONFIG
must be set before TensorFlow starts):

  python tests/distributed_run.py --strategy=default|mirrored|multi_worker|untrained \
      --out=w.npz
"""

import argparse
import os

import numpy as np

GLOBAL_BATCH, STEPS = 16, 3


def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6, 6, 1)).astype("float32")
  y = rng.integers(0, 4, size=GLOBAL_BATCH * STEPS)
  return x, y


def build_model(keras, tlm):
  keras.utils.set_random_seed(1)
  inputs = keras.Input((6, 6, 1))
  h = keras.layers.Conv2D(3, 3, activation="tanh", name="conv0")(inputs)
  h = keras.layers.Flatten()(h)
  h = keras.layers.Dense(
      8, activation="tanh", name="fc", kernel_regularizer=keras.regularizers.L2(1e-3)
  )(h)
  logits = keras.layers.Dense(4, name="logits")(h)
  model = tlm.MarginModel(
      inputs,
      logits,
      margin=tlm.LayerMargin(gamma=0.5, top_k=2),
      margin_layers=["input", "conv0", "fc"],
  )
  model.compile(
      keras.optimizers.SGD(0.5),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      loss_weights=0.5,
      metrics=["accuracy"],
  )
  return model


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--strategy", default="default")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if args.strategy == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  elif args.strategy == "multi_worker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    strategy = tf.distribute.get_strategy()
  import keras  # pylint: disable=g-import-not-at-top
  import tf_large_margin as tlm  # pylint: disable=g-import-not-at-top

  x, y = data()
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
  if args.strategy == "multi_worker":

    def local_batches(context):
      """This worker's slice of every global batch (one replica per worker)."""
      size = context.get_per_replica_batch_size(GLOBAL_BATCH)
      start = context.input_pipeline_id * size
      return dataset.map(
          lambda a, b: (a[start : start + size], b[start : start + size])
      )

    dataset = strategy.distribute_datasets_from_function(local_batches)
  with strategy.scope():
    model = build_model(keras, tlm)
  if args.strategy == "untrained":
    loss = np.nan
  else:
    loss = model.fit(dataset, epochs=1, verbose=0).history["loss"][-1]
  np.savez(
      args.out, loss=loss, **{f"w{i}": w for i, w in enumerate(model.get_weights())}
  )


if __name__ == "__main__":
  main()
