"""Mean ± std over seeds and paired 95 % Student-t intervals of the reproduction's
tables (`paper_report`, `robustness_report`)."""

import math

# Two-sided 95 % Student-t quantiles, t_{0.975}(df), for df = 1 .. 10.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_quantile(df):
  """t_{0.975}(df) (the normal quantile beyond the table)."""
  return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_std(values):
  """(mean, sample standard deviation; NaN for one value)."""
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


def paired_difference(a, b):
  """(mean, half-width, n) of a[s] - b[s] over the seeds s both {seed: value}
  dicts have, or None if they share none."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return None
  mean, half = paired_interval([a[s] - b[s] for s in seeds])
  return mean, half, len(seeds)


def format_difference(result, digits=2):
  """"+m [+lo, +hi]" of a (mean, half-width, n) triple; "–" for None."""
  if result is None:
    return "–"
  mean, half, n = result
  if n < 2:
    return f"{mean:+.{digits}f} (1 seed)"
  return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"
