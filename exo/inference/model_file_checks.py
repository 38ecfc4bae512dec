"""Values read from a model's files, checked before use: JSON objects read up to MAX_JSON_BYTES, and numbers checked for type
and range. A value that fails is a BadInput naming where it came from, and echoes the value only in bounded form."""

import json
import math
import reprlib
from pathlib import Path

from exo.base.errors import BadInput
from exo.base.files import read_bytes

MAX_JSON_BYTES = 16 << 20  # config.json, model.safetensors.index.json, a safetensors header: a 405B model's are under 2 MB


def read_json(path: Path, what: str) -> dict:
  """A JSON object file of a model (config.json, the safetensors index, tokenizer_config.json) of at most MAX_JSON_BYTES."""
  return parse_json_object(read_bytes(path, what, MAX_JSON_BYTES), f"{what} {str(path)!r}")


def parse_json_object(data: bytes, where: str) -> dict:
  try:
    value = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadInput(f"{where} is not valid JSON: {e}") from None
  except RecursionError:
    raise BadInput(f"{where} nests arrays or objects too deeply") from None
  if not isinstance(value, dict):
    raise BadInput(f"{where} must hold a JSON object, got {type(value).__name__}")
  return value


def shown(value) -> str:
  return reprlib.repr(value)  # bounded: a value from a file is never echoed whole


def whole_number(value, name: str, where: str, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise BadInput(f"{where}: {name} must be a whole number from {low} to {high}, got {shown(value)}")
  return value


def positive_number(value, name: str, where: str, below: float = math.inf) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < below:  # NaN fails too
    raise BadInput(f"{where}: {name} must be a number above 0{f' and below {below:g}' if below < math.inf else ''}, got {shown(value)}")
  return float(value)
