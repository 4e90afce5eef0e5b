r"""Robustness and margins of trained models: eval.json and PNG plots.

For each model given with ``--model`` (Keras ``.keras`` files returning logits, or
ending in ``CosineHead(return_norms=True)`` as the L-Softmax / SphereFace models of
the examples: their logits cos * scale are evaluated), on the first
``--num_examples`` test examples:

* clean accuracy;
* white-box accuracy under FGSM and iterative FGSM over the ``--epsilons`` grid, for
  each attack objective of ``--attack_losses`` (the softmax cross-entropy, and the
  logit margin max_{j != y} z_j - z_y, which a saturated softmax cannot mask) and
  their worst case (the reported number);
* black-box accuracy under the same attacks crafted on ``--source_model`` (Elsayed et
  al. 2018 transfer them from a cross-entropy model; not for the source model itself);
* how the source's FGSM directions u = sign(grad_x L_source) meet the model, per
  attack objective, over the correctly classified examples
  (`tf_large_margin.directional_margins`): the alignment of u with the model's own
  steepest logit-margin decrease (1: u is the model's own worst direction) and the
  smallest radius along u at which the model errs (``--transfer_steps`` grid
  intervals up to the largest epsilon); to first order the latter is the model's
  own l_inf margin divided by the alignment;
* the fraction of examples whose input gradient of each objective is zero
  (gradient masking: the attack leaves them unchanged);
* certified accuracy over the same ``--epsilons`` (``--certified_method``, interval
  bound propagation by default; `tf_large_margin.certified`): the fraction of
  examples whose prediction is correct and provably constant in the l_inf ball of
  radius epsilon intersected with the data range [0, 1] (where the attacks search),
  the floor under every attack's accuracy;
* accuracy under additive Gaussian noise over the ``--sigmas`` grid;
* margins of the correctly classified examples, in the ``--dist_norm`` norm: first
  order (Eq. 10's distance) at each of ``--margin_layers``, the linearised-logit
  distance in the input space and DeepFool's upper bound on the input-space margin
  (see `tf_large_margin.margin_estimation`).

Writes to ``--output_dir``: ``eval.json``, ``accuracy_vs_epsilon.png`` (one curve per
model; black-box dashed), ``gaussian_noise.png`` and ``margins_<model>.png``
(histograms per layer).

Example:

  python examples/evaluate.py --model=runs/xent/model.keras,runs/margin/model.keras \
      --source_model=runs/xent/model.keras --data_source=embedded \
      --output_dir=runs/eval
"""

import json
import os
import time

from absl import app
from absl import flags
import keras
import matplotlib
import numpy as np

import tf_large_margin  # pylint: disable=unused-import  (registers the custom objects)
from tf_large_margin import adversarial  # pylint: disable=unused-import
from tf_large_margin import attacks
from tf_large_margin import certified
from tf_large_margin import datasets
from tf_large_margin import directional_margins
from tf_large_margin import layers
from tf_large_margin import margin_estimation

matplotlib.use("Agg")
from matplotlib import pyplot  # pylint: disable=g-import-not-at-top,wrong-import-position

import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("model", None, "Comma-separated .keras model files to evaluate.")
flags.DEFINE_string(
    "source_model",
    None,
    "A .keras model the black-box adversarial "
    "examples are crafted on (none: no black-box evaluation).",
)
flags.DEFINE_enum("dataset", "mnist", list(datasets.DATASET_NAMES), "Data set.")
config_lib.define_flags(
    dict(batch_size=250, margin_layers=["input"], dist_norm=2),
    names=["data_source", "batch_size", "margin_layers", "dist_norm", "seed"],
    helps=dict(
        batch_size="Examples per batch.",
        margin_layers="Layers of the first-order margins ('input' or layer names).",
        dist_norm="Norm of the margins: 1, 2 or inf.",
        seed="Seed of the Gaussian noise.",
    ),
)
flags.DEFINE_integer(
    "num_examples", 0, "Test examples evaluated (the first ones; 0: all)."
)
flags.DEFINE_list(
    "epsilons",
    ["0", "0.05", "0.1", "0.15", "0.2", "0.25", "0.3"],
    "l_inf radii of FGSM and iterative FGSM, in [0, 1] pixel units.",
)
flags.DEFINE_integer(
    "ifgsm_steps", 10, "Steps of iterative FGSM (step size 2.5 epsilon / steps)."
)
flags.DEFINE_list(
    "sigmas",
    ["0", "0.1", "0.2", "0.3", "0.4", "0.5"],
    "Standard deviations of the Gaussian noise, in [0, 1] pixel units.",
)
flags.DEFINE_integer("deepfool_steps", 50, "DeepFool's maximum steps (0: skip it).")
flags.DEFINE_integer(
    "transfer_steps",
    60,
    "Grid intervals of the distance along the source's FGSM directions, up to the "
    "largest epsilon (0: skip the transfer analysis).",
)
flags.DEFINE_list(
    "thresholds",
    ["0.1", "0.3", "1.0"],
    "Margins summaries report the fraction of correct examples below these.",
)
flags.DEFINE_list(
    "attack_losses",
    list(attacks.ATTACK_LOSSES),
    "Objectives of the gradient attacks (xent, logit_margin); the reported "
    "white-box and black-box accuracies are their worst case.",
)
flags.DEFINE_enum(
    "certified_method",
    "ibp",
    ["none", *certified.METHODS],
    "Bound of the certified accuracy (none: skip it). crown is tightest and slowest.",
)
flags.DEFINE_string("output_dir", "eval", "Directory of eval.json and the plots.")

WHITE_BOX_ATTACKS = ("fgsm", "iterative_fgsm")
ATTACK_TITLES = {"fgsm": "FGSM", "iterative_fgsm": "Iterative FGSM"}
ESTIMATE_TITLES = {
    margin_estimation.LINEARIZED: "input (linearised logits)",
    margin_estimation.DEEPFOOL: "input (DeepFool)",
}


def progress(message):
  print(f"[evaluate] {message}", flush=True)


def model_name(path):
  """The model's name in the results: its file name, or its directory's name for
  the examples' ``<model_dir>/model.keras``."""
  stem = os.path.splitext(os.path.basename(path))[0]
  if stem == "model":
    return os.path.basename(os.path.dirname(os.path.abspath(path)))
  return stem


def load_model(path):
  """The saved model, returning logits (`layers.logits_model`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No model file {path}")
  return layers.logits_model(keras.models.load_model(path, compile=False))


def test_dataset():
  """The first ``--num_examples`` test examples as a batched tf.data set."""
  _, _, x_test, y_test = datasets.load_dataset(FLAGS.dataset, FLAGS.data_source)
  if FLAGS.num_examples:
    x_test, y_test = x_test[: FLAGS.num_examples], y_test[: FLAGS.num_examples]
  dataset = datasets.make_tf_dataset(
      x_test, y_test, FLAGS.batch_size, training=False, num_classes=datasets.NUM_CLASSES
  )
  return dataset, len(y_test)


def accuracy_curve(
    model, dataset, attack, values, source_model=None, loss=attacks.XENT
):
  """{str(value): accuracy} over a grid of ``epsilon`` (attacks) or ``sigma``."""
  curve = {}
  for value in values:
    start = time.time()
    if attack == "gaussian":
      kwargs = dict(sigma=value)
    elif attack == "iterative_fgsm":
      kwargs = dict(epsilon=value, steps=FLAGS.ifgsm_steps, loss=loss)
    else:
      kwargs = dict(epsilon=value, loss=loss)
    curve[str(value)] = attacks.robust_accuracy(
        model, dataset, attack, source_model=source_model, seed=FLAGS.seed, **kwargs
    )
    box = (
        ""
        if attack == "gaussian"
        else (" (white-box" if source_model is None else " (black-box") + f", {loss})"
    )
    progress(
        f"  {attack}{box} {value:g}: accuracy {curve[str(value)]:.4f} "
        f"({time.time() - start:.1f} s)"
    )
  return curve


def attack_curves(model, dataset, epsilons, source_model=None):
  """``(worst case, {loss: curves})``: per attack objective of --attack_losses the
  accuracy curves of the white-box attacks, and their minimum per epsilon."""
  by_loss = {
      loss: {
          attack: accuracy_curve(model, dataset, attack, epsilons, source_model, loss)
          for attack in WHITE_BOX_ATTACKS
      }
      for loss in FLAGS.attack_losses
  }
  worst = {
      attack: {
          value: min(curves[attack][value] for curves in by_loss.values())
          for value in by_loss[FLAGS.attack_losses[0]][attack]
      }
      for attack in WHITE_BOX_ATTACKS
  }
  return worst, by_loss


def zero_gradient_fractions(model, dataset):
  """{loss: fraction of the examples whose input gradient of it is zero}."""
  fractions = {}
  for loss in FLAGS.attack_losses:
    zero = total = 0
    for x, labels in dataset:
      zero += attacks.zero_gradient_fraction(model, x, labels, loss=loss) * len(labels)
      total += len(labels)
    fractions[loss] = zero / total
    progress(f"  zero input gradients ({loss}): {fractions[loss]:.4f}")
  return fractions


def certified_accuracy(model, dataset, epsilons):
  """{str(epsilon): fraction of examples certified correct in the l_inf ball,
  within the data range [0, 1] the attacks search too}.

  One bisection per example gives a certified radius r (0 if misclassified); the
  prediction provably holds for every epsilon <= r.
  """
  start = time.time()
  radii = np.concatenate(
      [
          certified.certified_radius(
              model,
              x,
              labels,
              norm=np.inf,
              method=FLAGS.certified_method,
              max_radius=max(max(epsilons), 1e-6),
              clip_min=0.0,
              clip_max=1.0,
          )
          for x, labels in dataset
      ]
  )
  curve = {str(e): float(np.mean((radii >= e) & (radii > 0))) for e in epsilons}
  progress(f"  certified accuracy ({FLAGS.certified_method}) {curve} ({time.time() - start:.1f} s)")
  return curve


def transfer_results(model, source_model, dataset, max_epsilon):
  """Per attack objective: summaries of the alignment of the source's FGSM
  directions with ``model``'s steepest logit-margin decrease, and of the radius
  along them at which ``model`` errs, over its correctly classified examples."""
  results = {}
  for loss in FLAGS.attack_losses:
    start = time.time()
    alignment, radii = [], []
    for x, labels in dataset:
      _, gradient = attacks.loss_gradient(source_model, x, labels, loss)
      direction = np.sign(gradient)
      alignment.append(
          directional_margins.direction_alignment(model, x, labels, direction)
      )
      radii.append(
          directional_margins.directional_margins(
              model, x, labels, direction, max_epsilon, FLAGS.transfer_steps
          )
      )
    alignment, radii = np.concatenate(alignment), np.concatenate(radii)
    correct = radii > 0
    results[loss] = dict(
        alignment=margin_estimation.summarize(alignment[correct]),
        directional_margin=margin_estimation.summarize(
            radii[correct], thresholds=[float(e) for e in FLAGS.epsilons]
        ),
    )
    progress(
        f"  transfer ({loss}): median alignment {np.median(alignment[correct]):.4f}, "
        f"median radius {np.median(radii[correct]):.4f} ({time.time() - start:.1f} s)"
    )
  return results


def margin_results(model, dataset, num_batches):
  """(per-example margins, their summaries over correctly classified examples)."""
  values = margin_estimation.dataset_margins(
      model,
      dataset,
      layers=FLAGS.margin_layers,
      dist_norm=FLAGS.dist_norm,
      deepfool_steps=FLAGS.deepfool_steps,
      progress=lambda i: progress(f"  margins: batch {i + 1}/{num_batches}"),
  )
  summary = margin_estimation.summarize_margins(
      values, thresholds=[float(t) for t in FLAGS.thresholds]
  )
  return values, summary


def evaluate_model(model, source_model, dataset, num_batches):
  """All the numbers of one model, and its per-example margins."""
  epsilons = [float(e) for e in FLAGS.epsilons]
  result = {"clean_accuracy": attacks.robust_accuracy(model, dataset)}
  progress(f"  clean accuracy {result['clean_accuracy']:.4f}")
  result["zero_gradient_fraction"] = zero_gradient_fractions(model, dataset)
  result["white_box"], result["white_box_by_loss"] = attack_curves(
      model, dataset, epsilons
  )
  if source_model is not None and source_model is not model:
    result["black_box"], result["black_box_by_loss"] = attack_curves(
        model, dataset, epsilons, source_model
    )
    if FLAGS.transfer_steps and max(epsilons) > 0:
      result["transfer"] = transfer_results(
          model, source_model, dataset, max(epsilons)
      )
  if FLAGS.certified_method != "none":
    try:
      result["certified"] = certified_accuracy(model, dataset, epsilons)
    except ValueError as error:  # a layer the bounds do not support
      result["certified_unavailable"] = str(error)
      progress(f"  no certified accuracy: {error}")
  result["gaussian"] = accuracy_curve(
      model, dataset, "gaussian", [float(s) for s in FLAGS.sigmas]
  )
  values, result["margins"] = margin_results(model, dataset, num_batches)
  return result, values


def plot_curves(axis, curve, label, linestyle="-"):
  grid = [float(v) for v in curve]
  axis.plot(grid, [100 * a for a in curve.values()], linestyle, marker="o", label=label)


def finish(figure, axes, xlabel, path):
  for axis in np.ravel(axes):
    axis.set_xlabel(xlabel)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)


def plot_accuracy_vs_epsilon(results, path):
  """One panel per attack, one curve per model (white-box solid, black-box dashed,
  certified dotted)."""
  figure, axes = pyplot.subplots(1, len(WHITE_BOX_ATTACKS), figsize=(11, 4.2))
  for axis, attack in zip(axes, WHITE_BOX_ATTACKS):
    for name, result in results.items():
      plot_curves(axis, result["white_box"][attack], f"{name} (white-box)")
      if "black_box" in result:
        plot_curves(axis, result["black_box"][attack], f"{name} (black-box)", "--")
      if "certified" in result:
        plot_curves(axis, result["certified"], f"{name} (certified)", ":")
    axis.set_title(ATTACK_TITLES[attack])
  finish(figure, axes, "epsilon (l_inf, pixels in [0, 1])", path)


def plot_gaussian(results, path):
  figure, axis = pyplot.subplots(figsize=(6, 4.2))
  for name, result in results.items():
    plot_curves(axis, result["gaussian"], name)
  axis.set_title("Additive Gaussian noise")
  finish(figure, axis, "noise standard deviation (pixels in [0, 1])", path)


def plot_margin_histograms(name, values, path):
  """One histogram per estimate (layers, DeepFool) over the correctly classified
  examples (DeepFool: those it flipped)."""
  estimates = [key for key in values if key != margin_estimation.CORRECT]
  columns = min(3, len(estimates))
  rows = -(-len(estimates) // columns)
  figure, axes = pyplot.subplots(
      rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False
  )
  for axis in axes.flat[len(estimates) :]:
    axis.set_visible(False)
  for axis, estimate in zip(axes.flat, estimates):
    kept = values[estimate][values["correct"]]
    kept = kept[np.isfinite(kept) & (kept > 0)]
    if kept.size:
      # Log-spaced bins: first-order margins on probabilities have heavy tails.
      axis.hist(
          kept,
          bins=np.geomspace(kept.min(), kept.max() * 1.001, 40),
          color="tab:blue",
          alpha=0.8,
      )
      axis.set_xscale("log")
      axis.axvline(
          np.median(kept), color="tab:red", label=f"median {np.median(kept):.3g}"
      )
      axis.legend()
    title = ESTIMATE_TITLES.get(estimate, f"{estimate} (first order, Eq. 10)")
    axis.set_title(f"{name}: {title}")
    norm = config_lib.format_norm(FLAGS.dist_norm)
    axis.set_xlabel(f"margin (l_{norm} distance)")
    axis.set_ylabel("correct test examples")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  pyplot.close(figure)


def main(argv):
  del argv
  if not FLAGS.model:
    raise app.UsageError("--model is required (one or more .keras files).")
  for loss in FLAGS.attack_losses:
    attacks.check_attack_loss(loss)
  names = [model_name(path) for path in FLAGS.model]
  if len(set(names)) != len(names):
    raise app.UsageError(
        f"The models' names {names} must differ (file names, or "
        "directory names for model.keras files)."
    )
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  dataset, num_examples = test_dataset()
  num_batches = -(-num_examples // FLAGS.batch_size)
  source_model = load_model(FLAGS.source_model) if FLAGS.source_model else None
  results = {}
  for name, path in zip(names, FLAGS.model):
    progress(f"{name} ({path}) on {num_examples} {FLAGS.dataset} test examples")
    model = source_model if path == FLAGS.source_model else load_model(path)
    result, values = evaluate_model(model, source_model, dataset, num_batches)
    results[name] = dict(path=path, **result)
    plot_margin_histograms(
        name, values, os.path.join(FLAGS.output_dir, f"margins_{name}.png")
    )
  plot_accuracy_vs_epsilon(
      results, os.path.join(FLAGS.output_dir, "accuracy_vs_epsilon.png")
  )
  plot_gaussian(results, os.path.join(FLAGS.output_dir, "gaussian_noise.png"))
  report = dict(
      dataset=FLAGS.dataset,
      data_source=FLAGS.data_source,
      num_examples=num_examples,
      source_model=FLAGS.source_model,
      ifgsm_steps=FLAGS.ifgsm_steps,
      dist_norm=config_lib.format_norm(FLAGS.dist_norm),
      margin_layers=FLAGS.margin_layers,
      deepfool_steps=FLAGS.deepfool_steps,
      transfer_steps=FLAGS.transfer_steps,
      attack_losses=FLAGS.attack_losses,
      certified_method=FLAGS.certified_method,
      seed=FLAGS.seed,
      models=results,
  )
  with open(os.path.join(FLAGS.output_dir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  progress(f"wrote {FLAGS.output_dir}/eval.json and the plots")


if __name__ == "__main__":
  app.run(main)
