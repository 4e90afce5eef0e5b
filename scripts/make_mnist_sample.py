"""Builds the class-balanced MNIST sample embedded in tf_large_margin/data.

Reads the full MNIST IDX files and writes a seeded, class-balanced sample
(by default 1,000 training and 200 test images per class) as gzipped IDX files
with the standard MNIST names, so `load_mnist_directory` reads it unchanged.
The selected examples keep their original order; the output is byte-for-byte
reproducible.

Usage (from the repository root):
  PYTHONPATH=. python scripts/make_mnist_sample.py \
      --source=../shared/data/mnist --out=tf_large_margin/data
"""

import argparse
import os

import numpy as np

from tf_large_margin import datasets


def _parse_args():
  """Parses the command line."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--source", required=True, help="directory with the full MNIST IDX files"
  )
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--train_per_class", type=int, default=1000)
  parser.add_argument("--test_per_class", type=int, default=200)
  return parser.parse_args()


def _write_split(out_dir, prefix, images, labels):
  """Writes one split as `prefix`-images/labels gzipped IDX files."""
  datasets.write_idx_images(
      os.path.join(out_dir, f"{prefix}-images-idx3-ubyte.gz"), images
  )
  datasets.write_idx_labels(
      os.path.join(out_dir, f"{prefix}-labels-idx1-ubyte.gz"), labels
  )
  print(f"{prefix}: {len(labels)} images, per class {np.bincount(labels).tolist()}")


def main():
  args = _parse_args()
  x_train, y_train, x_test, y_test = datasets.load_mnist_directory(args.source)
  num_classes = datasets.NUM_CLASSES
  # Different seeds per split so the two draws are independent.
  train = datasets.balanced_subset(
      x_train, y_train, args.train_per_class * num_classes, num_classes, args.seed
  )
  test = datasets.balanced_subset(
      x_test, y_test, args.test_per_class * num_classes, num_classes, args.seed + 1
  )
  os.makedirs(args.out, exist_ok=True)
  _write_split(args.out, "train", *train)
  _write_split(args.out, "t10k", *test)


if __name__ == "__main__":
  main()
