"""Fig. 3 of the reproduction (robustness), from the --task=robustness records of
`reproduce_mnist.py`: accuracy tables per attack, the paired differences to the
baselines, the figure, and how the black-box (transferred) attacks meet each model.

The transfer table (`transfer_table`) explains black-box accuracy to first order:
a model errs along the source's FGSM direction u at about its own l_inf margin
divided by the alignment of u with its steepest logit-margin decrease
(`tf_large_margin.directional_margins`), so a model can have larger white-box
margins and still be less robust to transferred examples if u aligns more with
its worst directions.
"""

import collections
import math

import reproduce_mnist
from paired_statistics import format_difference
from paired_statistics import mean_std
from paired_statistics import paired_difference

# Fig. 3's attacks: (record key, attack, title).
ATTACKS = (
    ("white_box", "fgsm", "white-box FGSM"),
    ("white_box", "iterative_fgsm", "white-box iterative FGSM"),
    ("black_box", "fgsm", "black-box FGSM"),
    ("black_box", "iterative_fgsm", "black-box iterative FGSM"),
)


def robustness_cells(records):
  """{method: {seed: record}} of the --task=robustness records."""
  cells = collections.defaultdict(dict)
  for record in records.values():
    if record["task"] == reproduce_mnist.ROBUSTNESS:
      cells[record["method"]][record["seed"]] = record
  return dict(cells)


def robust_accuracies(cells, box, attack, epsilon):
  """{seed: accuracy in %} of one attack (box "certified": the certified accuracy)."""
  accuracy = {}
  for seed, record in cells.items():
    curve = record.get(box) if box == "certified" else (record.get(box) or {}).get(attack)
    if curve and epsilon in curve:
      accuracy[seed] = 100 * curve[epsilon]
  return accuracy


def robust_difference(robustness, method, baseline, box, attack, epsilon):
  """As `difference`, for the accuracies under one attack."""
  if method not in robustness or baseline not in robustness:
    return None
  a = robust_accuracies(robustness[method], box, attack, epsilon)
  b = robust_accuracies(robustness[baseline], box, attack, epsilon)
  return paired_difference(a, b)


def robustness_epsilons(robustness):
  return sorted({e for cells in robustness.values() for r in cells.values()
                 for e in (r.get("certified") or r["white_box"]["fgsm"])}, key=float)


def robustness_tables(robustness, baselines):
  """The markdown of the robustness task: accuracy per attack and epsilon."""
  order = list(reproduce_mnist.METHODS)
  methods = sorted(robustness, key=order.index)
  first = next(iter(robustness[methods[0]].values()))
  lines = [
      "### Fig. 3: robustness", "",
      f"Models of the noisy_labels task at point {first['point']} (clean labels, each "
      "method at its chosen gamma); the first "
      f"{first['num_examples']} test images; accuracy (%) under each attack, the worst "
      f"case over the objectives {', '.join(first['attack_losses'])}; iterative FGSM "
      f"{first['ifgsm_steps']} steps; black-box examples crafted on the cross-entropy "
      "model of the next seed; mean ± std over seeds (n).",
  ]
  return "\n".join(lines) + "\n\n" + attack_tables(robustness, baselines)


def attack_tables(robustness, baselines):
  """Accuracy per epsilon and method, and margin − baseline (each baseline that
  was attacked, paired by seed), for each attack."""
  order = list(reproduce_mnist.METHODS)
  methods = sorted(robustness, key=order.index)
  epsilons = robustness_epsilons(robustness)
  pairs = [(m, b) for b in baselines if b in robustness
           for m in methods if reproduce_mnist.is_margin(m)]
  lines = []
  for box, attack, title in (*ATTACKS, ("certified", None, "certified (IBP)")):
    lines += ["", f"**{title}**", "",
              "| epsilon | " + " | ".join(methods) + " | "
              + " | ".join(f"{m} − {b}" for m, b in pairs) + " |",
              "|---" * (1 + len(methods) + len(pairs)) + "|"]
    for epsilon in epsilons:
      row = []
      for method in methods:
        values = list(robust_accuracies(robustness[method], box, attack, epsilon).values())
        if values:
          mean, std = mean_std(values)
          row.append(f"{mean:.1f} ± {std:.1f} ({len(values)})")
        else:
          row.append("–")
      row += [format_difference(robust_difference(robustness, m, b, box, attack, epsilon))
              for m, b in pairs]
      lines.append(f"| {epsilon} | " + " | ".join(row) + " |")
  return "\n".join(lines[1:])


def plot_robustness(robustness, path):
  """Fig. 3's panels: accuracy against epsilon per attack, one curve per method."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  order = list(reproduce_mnist.METHODS)
  epsilons = robustness_epsilons(robustness)
  figure, axes = pyplot.subplots(2, 2, figsize=(9, 7), sharex=True, sharey=True)
  for axis, (box, attack, title) in zip(axes.flat, ATTACKS):
    for method in sorted(robustness, key=order.index):
      xs, means, stds = [], [], []
      for epsilon in epsilons:
        values = list(robust_accuracies(robustness[method], box, attack, epsilon).values())
        if values:
          mean, std = mean_std(values)
          xs.append(float(epsilon))
          means.append(mean)
          stds.append(0.0 if math.isnan(std) else std)
      axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    axis.set_title(title)
    axis.grid(alpha=0.3)
  for axis in axes[1]:
    axis.set_xlabel("epsilon (l_inf, pixels in [0, 1])")
  for axis in axes[:, 0]:
    axis.set_ylabel("accuracy (%)")
  axes[0, 0].legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  pyplot.close(figure)


def median_of(*path):
  """A function of a record: the median of the summary at ``path`` (None where
  absent)."""

  def get(record):
    value = record
    for key in path:
      value = (value or {}).get(key)
    return None if value is None else value.get("median")

  return get


def black_box_fgsm(epsilon):
  """A function of a record: its black-box FGSM accuracy (%) at ``epsilon``."""

  def get(record):
    value = ((record.get("black_box") or {}).get("fgsm") or {}).get(epsilon)
    return None if value is None else 100 * value

  return get


# Rows of the transfer table: (title, value of a record, digits).
TRANSFER_ROWS = (
    ("black-box FGSM accuracy (%), epsilon 0.1", black_box_fgsm("0.1"), 1),
    ("black-box FGSM accuracy (%), epsilon 0.2", black_box_fgsm("0.2"), 1),
    ("white-box l_inf margin (linearised logits), median",
     median_of("margins", "linearized"), 3),
    ("alignment of the source's FGSM direction (cross-entropy), median",
     median_of("transfer", "xent", "alignment"), 3),
    ("l_inf radius along it at which the model errs, median",
     median_of("transfer", "xent", "directional_margin"), 3),
    ("alignment of the source's FGSM direction (logit margin), median",
     median_of("transfer", "logit_margin", "alignment"), 3),
    ("l_inf radius along it at which the model errs, median",
     median_of("transfer", "logit_margin", "directional_margin"), 3),
)


def transfer_table(robustness, baseline="xent"):
  """Per method with the transfer analysis: black-box FGSM accuracy, and medians
  over the model's correct test images of its white-box margin, of the alignment
  of the black-box source's FGSM directions with its worst directions and of the
  radius along them at which it errs; mean ± std over seeds and the paired
  difference to ``baseline``. "" if no record has the transfer analysis."""
  order = list(reproduce_mnist.METHODS)
  methods = sorted((m for m in robustness
                    if any(r.get("transfer") for r in robustness[m].values())), key=order.index)
  if not methods:
    return ""
  others = [m for m in methods if m != baseline]
  lines = ["| per model, mean ± std over seeds (n) | " + " | ".join(methods) + " | "
           + " | ".join(f"{m} − {baseline}" for m in others if baseline in methods) + " |",
           "|---" * (1 + len(methods) + (len(others) if baseline in methods else 0)) + "|"]
  for title, value_of, digits in TRANSFER_ROWS:
    values = {m: {s: value_of(r) for s, r in robustness[m].items()
                  if value_of(r) is not None} for m in methods}
    row = []
    for method in methods:
      if values[method]:
        mean, std = mean_std(list(values[method].values()))
        row.append(f"{mean:.{digits}f} ± {std:.{digits}f} ({len(values[method])})")
      else:
        row.append("–")
    if baseline in methods:
      for method in others:
        row.append(format_difference(
            paired_difference(values[method], values[baseline]), digits))
    lines.append(f"| {title} | " + " | ".join(row) + " |")
  return "\n".join(lines)
