"""Numbers and ids as a person reads them on a terminal: counts that agree with their noun, figures to 3 significant digits,
node ids short enough to leave room for the rest of a row."""

import math
import re

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def count(n: int, noun: str) -> str:
  """'1 node', '3 nodes' (nouns that take an s)."""
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def figure(x: float) -> str:
  """`x` rounded to 3 significant digits, without an exponent or trailing zeros: 0.0810593 -> '0.0811', 54.4 -> '54.4',
  1008 -> '1010', 10.0 -> '10'."""
  if x == 0 or not math.isfinite(x):
    return f"{x:g}"
  digits = 2 - math.floor(math.log10(abs(x)))
  text = f"{round(x, digits):.{max(digits, 0)}f}"
  return text.rstrip("0").rstrip(".") if "." in text else text


def short_id(node_id: str) -> str:
  """A random (uuid) node id's first 8 characters, which tell the nodes of a cluster apart; any other id as it is."""
  return node_id[:8] if _UUID.fullmatch(node_id) else node_id
