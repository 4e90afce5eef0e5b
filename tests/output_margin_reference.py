"""Shared by the output-margin loss tests: numpy transcriptions, fixtures."""

import keras
import numpy as np
import pytest

N, C = 48, 5

# --------------------------------------------------------------------------
# numpy references: literal per-example transcriptions of the formulas
# --------------------------------------------------------------------------


def np_xent(logits, y):
  logits = np.asarray(logits, np.float64)
  mx = logits.max()
  return -(logits[y] - mx - np.log(np.sum(np.exp(logits - mx))))


def np_crammer_singer(z, y, margin):
  worst_other = max(z[j] for j in range(len(z)) if j != y)
  return max(0.0, margin + worst_other - z[y])


def np_weston_watkins(z, y, margin):
  return sum(max(0.0, margin - (z[y] - z[j])) for j in range(len(z)) if j != y)


def np_am_softmax(c, y, margin, scale):
  logits = scale * np.array(c, np.float64)
  logits[y] = scale * (c[y] - margin)
  return np_xent(logits, y)


def np_arcface(c, y, margin, scale):
  logits = scale * np.array(c, np.float64)
  theta = np.arccos(np.clip(c[y], -1.0, 1.0))
  if theta + margin < np.pi:
    logits[y] = scale * np.cos(theta + margin)
  else:
    logits[y] = scale * (c[y] - margin * np.sin(margin))
  return np_xent(logits, y)


def np_psi_k(theta, m):
  k = min(int(np.floor(m * theta / np.pi)), m - 1)
  return (-1) ** k * np.cos(m * theta) - 2 * k, k


def np_l_softmax(c, norms, y, m):
  logits = np.array(norms, np.float64) * np.array(c, np.float64)
  psi, _ = np_psi_k(np.arccos(np.clip(c[y], -1.0, 1.0)), m)
  logits[y] = norms[y] * psi
  return np_xent(logits, y)


def per_example(fn, *arrays, **kw):
  return np.array(
      [
          fn(*[a[i] for a in arrays[:-1]], arrays[-1][i], **kw)
          for i in range(len(arrays[-1]))
      ]
  )


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


@pytest.fixture
def labels(rng):
  return rng.integers(0, C, size=N)


@pytest.fixture
def cos(rng):
  return rng.uniform(-1.0, 1.0, size=(N, C)).astype(np.float32)


@pytest.fixture
def norms(rng):
  return rng.uniform(0.5, 3.0, size=(N, C)).astype(np.float32)


def head_output(c, n):
  return np.concatenate([c, n], axis=-1).astype(np.float32)


def sphere_norms(rng):
  """SphereFace input: the per-class factor is ||x||, equal across classes."""
  return np.repeat(rng.uniform(0.5, 3.0, size=(N, 1)), C, axis=1).astype(np.float32)


def np_l_softmax_annealed(c, norms, y, m, lam):
  """Target logit (lam ||w|| ||x|| cos + ||w|| ||x|| psi) / (1 + lam), as written."""
  logits = np.array(norms, np.float64) * np.array(c, np.float64)
  psi, _ = np_psi_k(np.arccos(np.clip(c[y], -1.0, 1.0)), m)
  logits[y] = (lam * norms[y] * c[y] + norms[y] * psi) / (1.0 + lam)
  return np_xent(logits, y)


def np_lambda_decay(step, base, gamma, power, lambda_min):
  return max(lambda_min, base * (1.0 + gamma * step) ** (-power))


def keras_xent(labels, logits):
  """Keras' sparse softmax cross-entropy of ``logits``, per example (numpy)."""
  return np.asarray(
      keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
  )
