r"""Tables, figures and verdicts of the paper's MNIST experiments, from data.

  python examples/paper_report.py --out_dir=results/paper

Reads ``<out_dir>/cells.jsonl`` (written by `reproduce_mnist.py`, whose flags this
script shares) and writes ``<out_dir>/report.md`` and one figure per task,
``<out_dir>/<task>.png`` (the paper's axes: Fig. 2 right, test accuracy against the
training-set size; Fig. 2 left, against the fraction of noisy labels).

For each (task, point, method) the gamma is the one with the best validation
accuracy at --search_seed (as the driver chose it); a table entry is the mean ±
sample standard deviation of the test accuracy over the seeds of that gamma. The
difference of a margin method to a baseline is paired by seed (same subset, same
flipped labels, same initialisation) and given with its 95 % Student-t interval.

A claim of the paper is *reproduced* if the interval lies above 0 and the mean
difference is at least 70 % of the paper's, *partly* if the interval lies above 0
but the difference is smaller, and *not* otherwise.
"""

import collections
import math
import os

from absl import app
from absl import flags

import reproduce_mnist

flags.DEFINE_list(
    "report_baselines",
    ["xent", "xent_rmsprop"],
    "Methods the margin methods are compared with (paired by seed).",
)
FLAGS = flags.FLAGS

# Two-sided 95 % Student-t quantiles, t_{0.975}(df), for df = 1 .. 10.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)

# The paper's claims (Elsayed et al. 2018, Fig. 2): (task, point, method,
# baseline, paper's difference in accuracy points, what the paper says).
CLAIMS = (
    ("limited_data", "68", "margin_all", "xent", 3.7,
     "68 examples: all-layer linf margin beats cross-entropy by 3.7 points"),
    ("noisy_labels", "0.8", "margin_all_l2", "xent", 2.5,
     "80 % noisy labels: all-layer l2 margin 96.4 % vs cross-entropy 93.9 %"),
)
# The same comparisons with the logit score (beyond the paper).
LOGIT_VARIANTS = {"margin_all": "margin_all_logits", "margin_all_l2": "margin_all_logits_l2"}

AXES = {
    "limited_data": ("training examples", "Fig. 2 right: limited data", float, "log"),
    "noisy_labels": ("fraction of noisy labels", "Fig. 2 left: noisy labels", float, "linear"),
}


def t_quantile(df):
  """t_{0.975}(df) (the normal quantile beyond the table)."""
  return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_std(values):
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, float("nan")
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, math.sqrt(var)


def paired_interval(differences):
  """(mean, half-width of the 95 % t interval) of paired differences."""
  mean, std = mean_std(differences)
  if len(differences) < 2:
    return mean, float("nan")
  return mean, t_quantile(len(differences) - 1) * std / math.sqrt(len(differences))


def select(records, search_seed):
  """{(task, point, method): {seed: record}} at each method's chosen gamma: the
  gamma with the best validation accuracy among the --search_seed records."""
  by_key = collections.defaultdict(list)
  for record in records.values():
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
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return None
  diffs = [100 * (a[s]["test_accuracy"] - b[s]["test_accuracy"]) for s in seeds]
  mean, half = paired_interval(diffs)
  return mean, half, len(seeds)


def format_difference(result):
  if result is None:
    return "–"
  mean, half, n = result
  if n < 2:
    return f"{mean:+.2f} (1 seed)"
  return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def verdict(result, paper_difference):
  """reproduced / partly / not (with the reason), as the module docstring says."""
  if result is None:
    return "not run"
  mean, half, n = result
  if n < 2:
    return "open (1 seed)"
  if mean - half <= 0:
    return "not (the interval includes 0)" if mean + half > 0 else "not (margin is worse)"
  return "reproduced" if mean >= 0.7 * paper_difference else "partly (sign only)"


def points_of(selected, task):
  convert = AXES[task][2]
  return sorted({p for t, p, _ in selected if t == task}, key=convert)


def methods_of(selected, task):
  order = list(reproduce_mnist.METHODS)
  return sorted({m for t, _, m in selected if t == task}, key=order.index)


def task_tables(selected, task, baselines):
  """The markdown of one task: accuracies, paired differences, cell details."""
  points, methods = points_of(selected, task), methods_of(selected, task)
  lines = [f"### {AXES[task][1]}", "", "Test accuracy (%), mean ± std over seeds (n):", ""]
  lines.append("| point | " + " | ".join(methods) + " |")
  lines.append("|---" * (len(methods) + 1) + "|")
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
  margin_methods = [m for m in methods if reproduce_mnist.is_margin(m)]
  for baseline in baselines:
    if not any((task, p, baseline) in selected for p in points):
      continue
    lines += ["", f"Paired difference margin − {baseline} (points), mean [95 % interval]:", ""]
    lines.append("| point | " + " | ".join(margin_methods) + " |")
    lines.append("|---" * (len(margin_methods) + 1) + "|")
    for point in points:
      row = [format_difference(difference(selected, task, point, m, baseline))
             for m in margin_methods]
      lines.append(f"| {point} | " + " | ".join(row) + " |")
  lines += ["", "Cells: gamma (chosen on validation), steps, batch, epochs (% of the paper's "
            f"{reproduce_mnist.PAPER_EPOCHS}), fraction of training examples on which the margin "
            "term is active (gamma(1-alpha) < d < gamma; mean over checks and seeds) and median "
            "distance at the end, per layer:", ""]
  lines.append("| point | method | gamma | steps | batch | epochs | active fraction | "
               "median distance |")
  lines.append("|---" * 8 + "|")
  for point in points:
    for method in methods:
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


def _layer_means(dicts):
  layers = [k for k in dicts[0]] if dicts else []
  return {k: sum(d[k] for d in dicts) / len(dicts) for k in layers if all(k in d for d in dicts)}


def _format_layers(values, spec):
  return ", ".join(f"{k} {spec.format(v)}" for k, v in values.items()) or "–"


def claims_table(selected):
  lines = ["### The paper's claims", "",
           "| claim | score | measured difference [95 %] | verdict |", "|---|---|---|---|"]
  for task, point, method, baseline, paper, text in CLAIMS:
    for variant, score in ((method, "probabilities (paper)"),
                           (LOGIT_VARIANTS[method], "logits")):
      result = difference(selected, task, point, variant, baseline)
      lines.append(f"| {text} | {score} | {format_difference(result)} | "
                   f"{verdict(result, paper)} |")
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


def report(out_dir, search_seed, baselines):
  """Writes report.md and the figures; returns the report's text."""
  selected = select(reproduce_mnist.read_cells(out_dir), search_seed)
  tasks = [t for t in reproduce_mnist.TASKS if any(k[0] == t for k in selected)]
  sections = [claims_table(selected)]
  for task in tasks:
    sections.append(task_tables(selected, task, baselines))
    sections.append(f"![{task}]({task}.png)")
    plot(selected, task, os.path.join(out_dir, f"{task}.png"))
  text = "\n\n".join(sections) + "\n"
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


def main(_):
  print(report(FLAGS.out_dir, FLAGS.search_seed, FLAGS.report_baselines))


if __name__ == "__main__":
  app.run(main)
