"""Validation of scalar hyper-parameters shared by the losses and schedules."""

import math
import numbers


def check_real(name, value, *, positive=False, upper=None):
  """Returns ``value`` as a float after checking it is a finite real number.

  It must be >= 0 (> 0 if ``positive``) and, if ``upper`` is given, < ``upper``.
  Booleans are rejected. The ValueError names the argument and the value.
  """
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not math.isfinite(value)
  ):
    raise ValueError(f"`{name}` must be a finite real number, got {name}={value!r}.")
  if positive and value <= 0:
    raise ValueError(f"`{name}` must be positive (> 0), got {name}={value!r}.")
  if value < 0:
    raise ValueError(f"`{name}` must be non-negative (>= 0), got {name}={value!r}.")
  if upper is not None and value >= upper:
    raise ValueError(
        f"`{name}` is out of range: it must be < {upper}, got {name}={value!r}."
    )
  return float(value)
