r"""Tables, figures and verdicts of the paper's MNIST experiments, from data.

  python examples/paper_report.py --out_dir=results/paper --readme=README.md

Reads ``<out_dir>/cells.jsonl`` (written by `reproduce_mnist.py`, whose flags this
script shares) and writes ``<out_dir>/report.md`` and one figure per task,
``<out_dir>/<task>.png`` (the paper's axes: Fig. 2 right, test accuracy against the
training-set size; Fig. 2 left, against the fraction of noisy labels; Fig. 3,
adversarial accuracy against the l_inf radius epsilon, white-box and black-box
FGSM / iterative FGSM). With --readme, the marked table blocks of that file are
replaced, so a README's numbers come from the same data.

For each (task, point, method) the gamma is the one with the best validation
accuracy at --search_seed (as the driver chose it); a table entry is the mean ±
sample standard deviation of the test accuracy over the seeds of that gamma. The
difference of a margin method to a baseline is paired by seed (same subset, same
flipped labels, same initialisation) and given with its 95 % Student-t interval.

A claim of the paper is *reproduced* if the interval lies above 0 and the mean
difference is at least 70 % of the paper's, *partly* if the interval lies above 0
but the difference is smaller, and *not* otherwise. The robustness claims have no
size in the paper's text (only its Fig. 3 curves): their verdict is on the sign,
with at least SIGN_ONLY_MINIMUM points (10 of 1,000 test images) for *reproduced*.
"""

import collections
import math
import os
import re

from absl import app
from absl import flags

import reproduce_mnist
from paired_statistics import format_difference
from paired_statistics import mean_std
from paired_statistics import paired_difference
from robustness_report import ATTACKS
from robustness_report import attack_tables
from robustness_report import plot_robustness
from robustness_report import robust_difference
from robustness_report import robustness_cells
from robustness_report import robustness_tables
from robustness_report import transfer_table

flags.DEFINE_list(
    "report_baselines",
    ["xent", "xent_rmsprop"],
    "Methods the margin methods are compared with (paired by seed).",
)
flags.DEFINE_string(
    "readme", "",
    "A markdown file whose `<!-- paper_report:NAME -->` ... `<!-- /paper_report:NAME -->` "
    "blocks (NAME: claims, limited_data, noisy_labels, robustness, transfer) are replaced "
    "by the tables.")
flags.DEFINE_list(
    "readme_tables", [],
    "With --readme: only these blocks (default: every block the data has, e.g. "
    "--readme_tables=transfer for an --out_dir holding only the transfer analysis).")
FLAGS = flags.FLAGS

# The paper's claims (Elsayed et al. 2018, Fig. 2): (task, point, method,
# baseline, paper's difference in accuracy points or None where the paper's text
# gives no number (the sign only, read off the figure), what the paper says).
CLAIMS = (
    ("limited_data", "68", "margin_all", "xent", 3.7,
     "68 examples: all-layer linf margin beats cross-entropy by 3.7 points"),
    ("noisy_labels", "0.8", "margin_all_l2", "xent", 2.5,
     "80 % noisy labels: all-layer l2 margin 96.4 % vs cross-entropy 93.9 %"),
) + tuple(
    ("noisy_labels", point, "margin_all_l2", "xent", None,
     f"{percent} % noisy labels: all-layer l2 margin above cross-entropy (Fig. 2 left)")
    for point, percent in (("0.2", 20), ("0.4", 40), ("0.6", 60))
)
# Fig. 3: the all-layer linf margin model is more robust than cross-entropy, at
# every epsilon > 0 of white-box and black-box FGSM / iterative FGSM; checked at
# these radii (the sign only).
ROBUSTNESS_CLAIM_EPSILONS = ("0.1", "0.2")
SIGN_ONLY_MINIMUM = 1.0
# Each claim is checked for these variants of its method: (method, what differs).
CLAIM_VARIANTS = {
    "margin_all": (
        ("margin_all", "probabilities, k=1 (released config)"),
        ("margin_all_k9", "probabilities, k=9 worst case"),
        ("margin_all_logits", "logits, k=1"),
    ),
    "margin_all_l2": (
        ("margin_all_l2", "probabilities, k=1 (released config)"),
        ("margin_all_l2_k9", "probabilities, k=9 worst case"),
        ("margin_all_l2_k9sum", "probabilities, k=9 summed"),
        ("margin_all_logits_l2", "logits, k=1"),
        # The earlier l2 runs, with linf's "size" layer weights (not the original's).
        ("margin_all_l2size", "probabilities, k=1, size weights"),
        ("margin_all_l2size_k9", "probabilities, k=9 worst case, size weights"),
        ("margin_all_l2size_k9sum", "probabilities, k=9 summed, size weights"),
        ("margin_all_logits_l2size", "logits, k=1, size weights"),
    ),
}

AXES = {
    "limited_data": ("training examples", "Fig. 2 right: limited data", float, "log"),
    "noisy_labels": ("fraction of noisy labels", "Fig. 2 left: noisy labels", float, "linear"),
}


def select(records, search_seed):
  """{(task, point, method): {seed: record}} at each method's chosen gamma: the
  gamma with the best validation accuracy among the --search_seed records."""
  by_key = collections.defaultdict(list)
  for record in records.values():
    if record["task"] not in reproduce_mnist.TASKS:
      continue
    by_key[record["task"], record["point"], record["method"]].append(record)
  selected = {}
  for key, group in by_key.items():
    searched = [r for r in group if r["seed"] == search_seed]
    if not searched:
      continue
    gamma = max(searched, key=lambda r: r["best_validation_accuracy"])["gamma"]
    selected[key] = {r["seed"]: r for r in group if r["gamma"] == gamma}
  return selected


def accuracies(cells):
  return [100 * cells[s]["test_accuracy"] for s in sorted(cells)]


def difference(selected, task, point, method, baseline):
  """(mean, half-width, n) of the paired test-accuracy difference in points, or
  None if the two share no seed."""
  a = selected.get((task, point, method))
  b = selected.get((task, point, baseline))
  if not a or not b:
    return None
  return paired_difference(
      {s: 100 * r["test_accuracy"] for s, r in a.items()},
      {s: 100 * r["test_accuracy"] for s, r in b.items()})


def verdict(result, paper_difference):
  """reproduced / partly / not (with the reason), as the module docstring says;
  ``paper_difference`` None: the sign only."""
  if result is None:
    return "not run"
  mean, half, n = result
  if n < 2:
    return "open (1 seed)"
  if mean - half <= 0:
    return "not (the interval includes 0)" if mean + half > 0 else "not (margin is worse)"
  if paper_difference is None:
    if mean < SIGN_ONLY_MINIMUM:
      return f"not (below {SIGN_ONLY_MINIMUM:g} point)"
    return "reproduced (sign; no size in the paper's text)"
  return "reproduced" if mean >= 0.7 * paper_difference else "partly (sign only)"


def points_of(selected, task):
  convert = AXES[task][2]
  return sorted({p for t, p, _ in selected if t == task}, key=convert)


def methods_of(selected, task):
  order = list(reproduce_mnist.METHODS)
  return sorted({m for t, _, m in selected if t == task}, key=order.index)


def accuracy_table(selected, task):
  """Test accuracy (%) per point and method, mean ± std over seeds (n)."""
  points, methods = points_of(selected, task), methods_of(selected, task)
  lines = ["| point | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
  for point in points:
    row = []
    for method in methods:
      cells = selected.get((task, point, method))
      if not cells:
        row.append("–")
        continue
      mean, std = mean_std(accuracies(cells))
      row.append(f"{mean:.2f} ± {std:.2f} ({len(cells)})")
    lines.append(f"| {point} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def difference_table(selected, task, baseline):
  """The paired difference of every margin method to `baseline` per point."""
  points = points_of(selected, task)
  margin_methods = [m for m in methods_of(selected, task) if reproduce_mnist.is_margin(m)]
  lines = ["| point | " + " | ".join(margin_methods) + " |",
           "|---" * (len(margin_methods) + 1) + "|"]
  for point in points:
    row = [format_difference(difference(selected, task, point, m, baseline))
           for m in margin_methods]
    lines.append(f"| {point} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def cells_table(selected, task):
  """Per (point, method): gamma, steps, batch, epochs, margin activity, distance."""
  lines = ["| point | method | gamma | steps | batch | epochs | active fraction | "
           "median distance |", "|---" * 8 + "|"]
  for point in points_of(selected, task):
    for method in methods_of(selected, task):
      cells = selected.get((task, point, method))
      if not cells:
        continue
      first = next(iter(cells.values()))
      active = _layer_means([c["active_fraction_mean"] for c in cells.values()])
      medians = _layer_means([c["distance_median_final"] for c in cells.values()])
      gamma = "–" if first["gamma"] is None else f"{first['gamma']:g}"
      lines.append(
          f"| {point} | {method} | {gamma} | {first['train_steps']} | {first['batch_size']} | "
          f"{first['epochs']:.1f} ({100 * first['fraction_of_paper_epochs']:.1f} %) | "
          f"{_format_layers(active, '{:.3f}')} | {_format_layers(medians, '{:.3g}')} |"
      )
  return "\n".join(lines)


def accuracy_section(selected, task):
  return "Test accuracy (%), mean ± std over seeds (n):\n\n" + accuracy_table(selected, task)


def difference_sections(selected, task, baselines):
  """Captioned `difference_table`s, one per baseline that has cells in the task."""
  return [f"Paired difference margin − {baseline} (points), mean [95 % interval]:\n\n"
          + difference_table(selected, task, baseline)
          for baseline in baselines
          if any(t == task and m == baseline for t, _, m in selected)]


def task_tables(selected, task, baselines):
  """The markdown of one task: accuracies, paired differences, cell details."""
  parts = [f"### {AXES[task][1]}", accuracy_section(selected, task),
           *difference_sections(selected, task, baselines)]
  parts += ["Cells: gamma (chosen on validation), steps, batch, epochs (% of the paper's "
            f"{reproduce_mnist.PAPER_EPOCHS}), fraction of training examples on which the margin "
            "term is active (gamma(1-alpha) < d < gamma; mean over checks and seeds) and median "
            "distance at the end, per layer:", cells_table(selected, task)]
  return "\n\n".join(parts)


def _layer_means(dicts):
  layers = [k for k in dicts[0]] if dicts else []
  return {k: sum(d[k] for d in dicts) / len(dicts) for k in layers if all(k in d for d in dicts)}


def _format_layers(values, spec):
  return ", ".join(f"{k} {spec.format(v)}" for k, v in values.items()) or "–"


def claims_table(selected, robustness):
  """One row per (claim, variant): the paired difference and its verdict."""
  lines = ["| claim | variant | measured difference [95 %] | verdict |", "|---|---|---|---|"]
  for task, point, method, baseline, paper, text in CLAIMS:
    for variant, score in CLAIM_VARIANTS[method]:
      result = difference(selected, task, point, variant, baseline)
      if result is None and variant != method:
        continue  # A variant not run is not a row.
      lines.append(f"| {text} | {score} | {format_difference(result)} | "
                   f"{verdict(result, paper)} |")
  if robustness:
    for box, attack, title in ATTACKS:
      for epsilon in ROBUSTNESS_CLAIM_EPSILONS:
        for variant, score in (("margin_all", "probabilities, k=1 (released config)"),
                               ("margin_all_logits", "logits, k=1")):
          result = robust_difference(robustness, variant, "xent", box, attack, epsilon)
          lines.append(f"| {title}, epsilon {epsilon}: all-layer linf margin more accurate "
                       f"than cross-entropy | {score} | {format_difference(result)} | "
                       f"{verdict(result, None)} |")
  return "\n".join(lines)


def plot(selected, task, path):
  """The task's figure: mean test accuracy ± std against the point, per method."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  label, title, convert, scale = AXES[task]
  figure, axes = pyplot.subplots(figsize=(6, 4))
  for method in methods_of(selected, task):
    xs, means, stds = [], [], []
    for point in points_of(selected, task):
      cells = selected.get((task, point, method))
      if cells:
        mean, std = mean_std(accuracies(cells))
        xs.append(convert(point))
        means.append(mean)
        stds.append(0.0 if math.isnan(std) else std)
    axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
  axes.set_xscale(scale)
  axes.set_xlabel(label)
  axes.set_ylabel("test accuracy (%)")
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  pyplot.close(figure)


def load(out_dir, search_seed):
  """(selected, robustness) of ``<out_dir>/cells.jsonl``: `select` and
  `robustness_cells` of its records."""
  records = reproduce_mnist.read_cells(out_dir)
  return select(records, search_seed), robustness_cells(records)


def report(out_dir, search_seed, baselines):
  """Writes report.md and the figures of ``<out_dir>/cells.jsonl``; returns the
  report's text."""
  return write_report(out_dir, *load(out_dir, search_seed), baselines)


def write_report(out_dir, selected, robustness, baselines):
  """Writes report.md and the figures into `out_dir`; returns the report's text."""
  tasks = [t for t in reproduce_mnist.TASKS if any(k[0] == t for k in selected)]
  sections = ["### The paper's claims\n\n" + claims_table(selected, robustness)]
  for task in tasks:
    sections.append(task_tables(selected, task, baselines))
    sections.append(f"![{task}]({task}.png)")
    plot(selected, task, os.path.join(out_dir, f"{task}.png"))
  if robustness:
    name = reproduce_mnist.ROBUSTNESS
    sections.append(robustness_tables(robustness, baselines))
    transfer = transfer_table(robustness)
    if transfer:
      sections.append("### How the black-box examples meet each model\n\n" + transfer)
    sections.append(f"![{name}]({name}.png)")
    plot_robustness(robustness, os.path.join(out_dir, f"{name}.png"))
  text = "\n\n".join(sections) + "\n"
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


README_TABLES = ("claims", *AXES, reproduce_mnist.ROBUSTNESS, "transfer")
README_BLOCK = re.compile(
    r"(<!-- paper_report:(?P<name>[a-z_]+) -->\n)(?:.*?\n)?(<!-- /paper_report:(?P=name) -->)",
    re.DOTALL)


def readme_blocks(selected, robustness, baselines):
  """{name: markdown} of the tables a README embeds: "claims", each task's accuracy
  table and its difference table to the first baseline, "robustness"'s attack
  tables (every baseline) and, where the records have it, "transfer"
  (`robustness_report.transfer_table`)."""
  blocks = {"claims": claims_table(selected, robustness)}
  for task in AXES:
    blocks[task] = "\n\n".join(
        [accuracy_section(selected, task), *difference_sections(selected, task, baselines[:1])])
  if robustness:
    blocks[reproduce_mnist.ROBUSTNESS] = attack_tables(robustness, baselines)
    transfer = transfer_table(robustness)
    if transfer:
      blocks["transfer"] = transfer
  return blocks


def update_readme(path, blocks):
  """Replaces the text between `<!-- paper_report:NAME -->` and
  `<!-- /paper_report:NAME -->` in `path` by blocks[NAME]; returns the names. A
  block of a known table the data does not have stays as it is; an unknown NAME
  raises ValueError."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  names = []

  def replace(match):
    name = match.group("name")
    if name not in README_TABLES:
      raise ValueError(f"{path}: no table {name!r} (tables: {README_TABLES})")
    if name not in blocks:
      return match.group(0)
    names.append(name)
    return match.group(1) + blocks[name] + "\n" + match.group(3)

  text = README_BLOCK.sub(replace, text)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return names


def main(_):
  selected, robustness = load(FLAGS.out_dir, FLAGS.search_seed)
  print(write_report(FLAGS.out_dir, selected, robustness, FLAGS.report_baselines))
  if FLAGS.readme:
    blocks = readme_blocks(selected, robustness, FLAGS.report_baselines)
    if FLAGS.readme_tables:
      blocks = {name: blocks[name] for name in FLAGS.readme_tables}
    names = update_readme(FLAGS.readme, blocks)
    print(f"{FLAGS.readme}: tables {', '.join(names)} updated")


if __name__ == "__main__":
  app.run(main)
