"""Value types of the exo commands' flags: argparse reports a bad value as one usage error naming the flag."""

import argparse


def positive_int(text: str) -> int:
  """A whole number >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
  return value


def slowdown_factor(text: str) -> float:
  """A factor >= 1."""
  try:
    factor = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a factor >= 1, got {text!r}") from None
  if not factor >= 1:
    raise argparse.ArgumentTypeError(f"expected a factor >= 1, got {text!r}")
  return factor
