"""`MarginMonitor`: a Keras callback that tracks the margins of a validation subset.

Every ``every_n_epochs`` epochs it computes, on a fixed subset of at most
``num_examples`` validation examples (evaluated in batches of ``batch_size``), the
per-example margin estimates of `tf_large_margin.margin_estimation`:

* Eq. 10's first-order distance at each margin layer h (Elsayed et al. 2018),

      d_h = (p_y - p_j) / (epsilon + || grad_h (p_y - p_j) ||_q),

  at the layers ``model.margin_layers`` of a `MarginModel` (or only the input for
  another model), keyed by the layer name;
* the linearised input margin ("linearized"),

      d = min_{k != y} (z_y - z_k) / || grad_x (z_y - z_k) ||_q;

* optionally (``deepfool=True``) the DeepFool input margin ("deepfool"), an upper
  bound on the distance to the boundary.

For each estimate it logs, over the correctly classified examples as
`tf_large_margin.margin_estimation.summarize_margins` does, the median and the 10th percentile

    margin_median/<name> = median_{i: correct} d_i
    margin_p10/<name>    = quantile_{0.1}({d_i : i correct})

as TensorBoard scalars and in the epoch ``logs`` (so that `keras.callbacks.History`
and `keras.callbacks.CSVLogger`, placed after the monitor in the callback list, see
them; epochs without a measurement log NaN so every epoch has the same keys), and
the distributions as TensorBoard histograms ("margin_distribution/<name>", correct
examples with finite margins). At the end of training it can write a PNG of the final
distributions.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import argument_checks
from tf_large_margin import margin_loss
from tf_large_margin import margin_estimation
from tf_large_margin import margin_penalty

MEDIAN = "margin_median"
P10 = "margin_p10"
DISTRIBUTION = "margin_distribution"
P10_QUANTILE = 0.1


# ---------------------------------------------------------------------------
# Validation and the subset
# ---------------------------------------------------------------------------


def check_positive_int(name, value):
  """Returns ``value`` as an int after checking it is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
  return int(value)


def check_optional_path(name, path):
  """Returns ``path`` as a str (or None) after checking it is a path."""
  if path is None:
    return None
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise ValueError(f"{name} must be None or a non-empty path; got {path!r}.")
  return os.fspath(path)


def class_ids(y):
  """[N] integer labels from integer labels [N] / [N, 1] or one-hot labels [N, C]."""
  y = np.asarray(y)
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  elif y.ndim == 2:
    y = np.argmax(y, axis=1)
  if y.ndim != 1:
    raise ValueError(
        f"y must be integer labels [N] or one-hot labels [N, classes]; got shape "
        f"{y.shape}."
    )
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"Integer labels must have an integer dtype; got {y.dtype}.")
  return y


def validation_subset(x, y, num_examples):
  """``(x[:n] as float32, labels[:n])`` with n = min(num_examples, len(x)).

  The first ``num_examples`` examples: the same subset at every measurement.
  """
  labels = class_ids(y)
  x = np.asarray(x)
  if x.ndim < 1 or len(x) == 0:
    raise ValueError(f"x must be a non-empty batch [N, ...]; got shape {x.shape}.")
  if len(x) != len(labels):
    raise ValueError(
        f"x and y must have the same number of examples; got {len(x)} and "
        f"{len(labels)}."
    )
  return x[:num_examples].astype(np.float32), labels[:num_examples]


def batches(x, labels, batch_size):
  """The list of ``(x, labels)`` batches of at most ``batch_size`` examples."""
  return [
      (x[i : i + batch_size], labels[i : i + batch_size])
      for i in range(0, len(x), batch_size)
  ]


def monitored_layers(model):
  """The layers of the first-order margins: ``model.margin_layers`` if the model has
  them (a `MarginModel`), else only the input."""
  layers = getattr(model, "margin_layers", None)
  return tuple(layers) if layers else (margin_estimation.INPUT,)


# ---------------------------------------------------------------------------
# Statistics, summaries and the plot
# ---------------------------------------------------------------------------


def estimate_names(layers, deepfool):
  """The names of the monitored estimates: the layers, "linearized", "deepfool"."""
  extra = (margin_estimation.LINEARIZED, margin_estimation.DEEPFOOL) if deepfool else (margin_estimation.LINEARIZED,)
  return tuple(layers) + extra


def statistic_keys(names):
  """The logged keys: ``margin_median/<name>`` and ``margin_p10/<name>`` per name."""
  return tuple(f"{prefix}/{name}" for name in names for prefix in (MEDIAN, P10))


def margin_statistics(margins_by_name):
  """The median and the 10th percentile of each estimate over correct examples.

  Args:
    margins_by_name: a `tf_large_margin.margin_estimation.dataset_margins` result.

  Returns:
    {"margin_median/<name>": median, "margin_p10/<name>": 10th percentile} as
    floats, computed by `summarize_margins` (NaN without correct examples).
  """
  summaries = margin_estimation.summarize_margins(
      margins_by_name, only_correct=True, quantiles=(P10_QUANTILE,)
  )
  statistics = {}
  for name, summary in summaries.items():
    for key, value in (
        (MEDIAN, summary["median"]),
        (P10, summary["quantiles"][str(P10_QUANTILE)]),
    ):
      statistics[f"{key}/{name}"] = math.nan if value is None else value
  return statistics


def distribution(margins_by_name, name):
  """The finite margins of the correctly classified examples for estimate ``name``."""
  values = margins_by_name[name][margins_by_name[margin_estimation.CORRECT]]
  return values[np.isfinite(values)]


def write_summaries(writer, margins_by_name, statistics, step):
  """Writes the histograms and scalars of one measurement at ``step``."""
  names = [name for name in margins_by_name if name != margin_estimation.CORRECT]
  with writer.as_default(step=step):
    for name in names:
      tf.summary.histogram(
          f"{DISTRIBUTION}/{name}", distribution(margins_by_name, name)
      )
    for key, value in statistics.items():
      tf.summary.scalar(key, value)
  writer.flush()


def plot_margins(margins_by_name, path, title=""):
  """Saves a PNG with one histogram per estimate (correct examples, finite values),
  the median and the 10th percentile marked. Uses matplotlib's Agg canvas directly
  (no pyplot, the global backend is untouched)."""
  # Imported here: matplotlib is only needed for the plot.
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top

  names = [name for name in margins_by_name if name != margin_estimation.CORRECT]
  fig = figure.Figure(figsize=(4 * len(names), 3.2), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  for axes, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
    values = distribution(margins_by_name, name)
    if values.size:
      axes.hist(values, bins=30, color="tab:blue", alpha=0.8)
      axes.axvline(np.median(values), color="k", label="median")
      axes.axvline(
          np.quantile(values, P10_QUANTILE), color="k", ls="--", label="10th percentile"
      )
      axes.legend(fontsize="small")
    estimate = name in (margin_estimation.LINEARIZED, margin_estimation.DEEPFOOL)
    axes.set_title(f"{name} (input)" if estimate else f"first order at {name}")
    axes.set_xlabel("margin")
  fig.suptitle(title)
  fig.savefig(path, format="png", dpi=80)


# ---------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------


class MarginMonitor(keras.callbacks.Callback):
  """Logs margin statistics of a fixed validation subset during training.

  Every ``every_n_epochs`` epochs (after epochs n - 1, 2n - 1, ... counted from 0),
  computes `tf_large_margin.margin_estimation.dataset_margins` on the first ``num_examples``
  examples of ``(x, y)`` in batches of ``batch_size``, and logs the median and 10th
  percentile over correctly classified examples of each estimate (Eq. 10's
  first-order distance at each margin layer, the linearised input margin and
  optionally DeepFool's) in the epoch ``logs`` and, with ``log_dir``, as
  TensorBoard scalars and histograms. Put it before `keras.callbacks.CSVLogger` in
  the callback list so that the logger sees its keys.

  ```python
  monitor = MarginMonitor(x_val, y_val, log_dir="logs/margins", plot_path="m.png")
  model.fit(x, y, epochs=10, callbacks=[monitor])
  model.history.history["margin_median/linearized"]
  ```

  Attributes:
    margins: the latest measurement, a `dataset_margins` dict of [n] arrays.
    statistics: the latest logged statistics, {key: float}.
    measured_epochs: the epochs at which the margins were measured.
  """

  def __init__(
      self,
      x,
      y,
      log_dir=None,
      num_examples=256,
      every_n_epochs=1,
      batch_size=128,
      dist_norm=2,
      deepfool=False,
      deepfool_steps=50,
      overshoot=0.02,
      layers=None,
      plot_path=None,
  ):
    """Creates the monitor.

    Args:
      x: [N, ...] validation inputs (as the model takes them).
      y: [N] integer labels or [N, classes] one-hot labels.
      log_dir: TensorBoard log directory for the event files, or None (only the
        epoch ``logs``).
      num_examples: the subset is the first ``num_examples`` examples, >= 1.
      every_n_epochs: measure after every n-th epoch, >= 1.
      batch_size: examples per margin computation, >= 1.
      dist_norm: 1, 2 or np.inf, the norm of all the estimates.
      deepfool: also compute the DeepFool input margin (the most expensive).
      deepfool_steps: DeepFool's maximum number of steps, >= 1.
      overshoot: DeepFool's overshoot, >= 0.
      layers: the layer names of the first-order margins ("input" for the
        input); default ``model.margin_layers``, or only the input for a model
        without them.
      plot_path: where to save a PNG of the final distributions at the end of
        training, or None.
    """
    super().__init__()
    num_examples = check_positive_int("num_examples", num_examples)
    self.x, self.labels = validation_subset(x, y, num_examples)
    self.log_dir = check_optional_path("log_dir", log_dir)
    self.plot_path = check_optional_path("plot_path", plot_path)
    self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
    self.batch_size = check_positive_int("batch_size", batch_size)
    margin_loss.dual_norm(dist_norm)
    self.dist_norm = dist_norm
    if not isinstance(deepfool, (bool, np.bool_)):
      raise ValueError(f"deepfool must be True or False; got {deepfool!r}.")
    self.deepfool = bool(deepfool)
    self.deepfool_steps = argument_checks.check_steps(
        deepfool_steps, "deepfool_steps"
    )
    self.overshoot = argument_checks.check_nonnegative("overshoot", overshoot)
    self.layers = None if layers is None else self._checked_layers(layers)
    self.margins = None
    self.statistics = None
    self.measured_epochs = []
    self._writer = None
    self._last_epoch = None
    self._measured_last_epoch = False

  @staticmethod
  def _checked_layers(layers):
    """The layer names as a tuple: non-empty, not a reserved estimate name."""
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    if not layers:
      raise ValueError("layers is empty: name at least one layer or 'input'.")
    reserved = set(layers) & set(margin_estimation.RESERVED)
    if reserved:
      raise ValueError(
          f"The names {margin_estimation.RESERVED} are reserved; got layers {layers}."
      )
    return layers

  def monitored_layers(self):
    """The layer names of the first-order margins for the current model."""
    if self.layers is not None:
      return self.layers
    return self._checked_layers(monitored_layers(self.model))

  @property
  def keys(self):
    """The keys this monitor adds to the epoch ``logs``."""
    return statistic_keys(estimate_names(self.monitored_layers(), self.deepfool))

  def compute_margins(self):
    """The margins of the subset on the current weights (`dataset_margins`)."""
    return margin_estimation.dataset_margins(
        self.model,
        batches(self.x, self.labels, self.batch_size),
        layers=self.monitored_layers(),
        dist_norm=self.dist_norm,
        deepfool_steps=self.deepfool_steps if self.deepfool else 0,
        overshoot=self.overshoot,
    )

  def measure(self, epoch):
    """Computes the margins, writes the summaries; returns the statistics."""
    self.margins = self.compute_margins()
    self.statistics = margin_statistics(self.margins)
    self.measured_epochs.append(epoch)
    if self._writer is not None:
      write_summaries(self._writer, self.margins, self.statistics, epoch)
    return self.statistics

  def on_train_begin(self, logs=None):
    self._last_epoch = None
    self._measured_last_epoch = False
    # Unknown layer names raise here, before the first epoch.
    margin_estimation.layer_endpoints(self.model, self.monitored_layers())
    if self.log_dir is not None and self._writer is None:
      self._writer = tf.summary.create_file_writer(self.log_dir)

  def on_epoch_end(self, epoch, logs=None):
    self._last_epoch = epoch
    self._measured_last_epoch = (epoch + 1) % self.every_n_epochs == 0
    if self._measured_last_epoch:
      values = self.measure(epoch)
    else:
      values = dict.fromkeys(self.keys, math.nan)
    if logs is not None:
      logs.update(values)

  def on_train_end(self, logs=None):
    if self.plot_path is not None:
      if not self._measured_last_epoch:
        self.margins = self.compute_margins()  # the final weights' distributions
      epoch = "" if self._last_epoch is None else f" after epoch {self._last_epoch + 1}"
      plot_margins(self.margins, self.plot_path, f"Margins{epoch}")
    if self._writer is not None:
      self._writer.close()
      self._writer = None


ACTIVE = "margin_active"
DISTANCE_MEDIAN = "margin_distance_median"


class MarginActivity(keras.callbacks.Callback):
  """Logs, per margin layer of a `MarginModel`, how much of its margin term binds.

  After every epoch, on a fixed subset of (typically training) examples, it
  computes the distances d_l the margin term sees (`MarginModel.layer_distances`:
  the model's score, norm, epsilon and layer weights) and adds to the epoch
  ``logs``, for each margin layer l,

      margin_active/<l>           fraction of examples with
                                  gamma (1 - alpha_factor) < d_l < gamma
                                  (`margin_penalty.active_fraction`),
      margin_distance_median/<l>  median over examples of the smallest d_l,

  so that `keras.callbacks.CSVLogger` placed after it records them. A layer
  active on 0 % of the examples contributes no gradient.

  Args:
    x, y: inputs and integer (or one-hot) labels; the first ``num_examples`` are used.
    num_examples, batch_size: subset size and examples per forward pass, >= 1.
  """

  def __init__(self, x, y, num_examples=1000, batch_size=250):
    super().__init__()
    num_examples = check_positive_int("num_examples", num_examples)
    self.x, self.labels = validation_subset(x, y, num_examples)
    self.batch_size = check_positive_int("batch_size", batch_size)

  def measure(self):
    """{key: value} of the current weights (the keys listed in the class doc)."""
    margin = self.model.margin
    distances = [[] for _ in self.model.margin_layers]
    for x, labels in batches(self.x, self.labels, self.batch_size):
      for l, d in enumerate(self.model.layer_distances(x, labels)):
        distances[l].append(d)
    values = {}
    for name, parts in zip(self.model.margin_layers, distances):
      d = tf.concat(parts, axis=0)
      fraction = margin_penalty.active_fraction(
          d, margin.gamma, margin.alpha_factor, margin.worst_case_loss
      )
      values[f"{ACTIVE}/{name}"] = float(fraction)
      values[f"{DISTANCE_MEDIAN}/{name}"] = float(
          np.median(tf.reduce_min(d, axis=1).numpy())
      )
    return values

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs.update(self.measure())
