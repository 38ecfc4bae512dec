"""What a device can do: memory, peak TFLOPS per precision and memory bandwidth."""

import math
from dataclasses import asdict, dataclass, field, replace

from exo.base.errors import BadInput

MAX_LAYERS_HELD = 4096  # no model has more layers (exo.base.model_spec.MAX_LAYERS_HELD is smaller)
MAX_TRANSFERS = 64
MAX_FILE_BYTES = 2**42  # 4 TiB: larger than any model file


@dataclass(frozen=True)
class DeviceFlops:
  """Peak throughput in TFLOPS (1e12 operations per second); 0 means unknown."""

  fp32: float = 0.0
  fp16: float = 0.0
  int8: float = 0.0

  def to_dict(self) -> dict:
    return asdict(self)


@dataclass(frozen=True)
class LayerTimes:
  """One layer's time on a node's own engine for one model: `decode_ms` for one token at batch 1, `token_ms` the marginal time
  of each extra token when many run at once (as in a prefill). Measured; they take precedence over the roofline."""

  decode_ms: float
  token_ms: float

  def to_dict(self) -> dict:
    return {"decode_ms": self.decode_ms, "token_ms": self.token_ms}

  @staticmethod
  def from_dict(data: dict, where: str) -> "LayerTimes":
    if not isinstance(data, dict):
      raise BadInput(f"{where} must be a JSON object with decode_ms and token_ms, got {data!r}")
    reject_unknown_keys(data, {"decode_ms", "token_ms"}, where)
    for key in ("decode_ms", "token_ms"):
      if key not in data:
        raise BadInput(f"{where} is missing {key!r}")
    decode_ms = non_negative_number(data["decode_ms"], f"{where}.decode_ms")
    if decode_ms <= 0:
      raise BadInput(f"{where}.decode_ms must be > 0, got {data['decode_ms']!r}")
    return LayerTimes(decode_ms, non_negative_number(data["token_ms"], f"{where}.token_ms"))


@dataclass(frozen=True)
class FileTransfer:
  """A model file arriving at a node: `name` (repository/file), bytes received of its total, and where from (peer ids, "hub")."""

  name: str
  received_bytes: int
  total_bytes: int
  source: str = ""

  def to_dict(self) -> dict:
    return asdict(self)

  @staticmethod
  def from_dict(data: dict, where: str) -> "FileTransfer":
    if not isinstance(data, dict):
      raise BadInput(f"{where} must be a JSON object with name, received_bytes, total_bytes and source, got {data!r}")
    reject_unknown_keys(data, {"name", "received_bytes", "total_bytes", "source"}, where)
    sizes = [data.get(k, 0) for k in ("received_bytes", "total_bytes")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_FILE_BYTES for n in sizes) or sizes[0] > sizes[1]:
      raise BadInput(f"{where}: received_bytes and total_bytes must be whole numbers of bytes, received at most total, got {sizes}")
    return FileTransfer(_string(data.get("name", ""), f"{where}.name"), *sizes, _string(data.get("source", ""), f"{where}.source"))


def layer_ranges(layers) -> tuple[tuple[int, int], ...]:
  """Layer indices as sorted, disjoint (first, last) ranges."""
  ranges: list[list[int]] = []
  for layer in sorted(set(layers)):
    if ranges and ranges[-1][1] == layer - 1:
      ranges[-1][1] = layer
    else:
      ranges.append([layer, layer])
  return tuple((a, b) for a, b in ranges)


def _holdings(data, where: str) -> dict[str, tuple[tuple[int, int], ...]]:
  if not isinstance(data, dict) or not all(isinstance(k, str) and k for k in data):
    raise BadInput(f"{where} must be a JSON object mapping model ids to [first, last] layer ranges, got {data!r}")
  out = {}
  for model_id, ranges in data.items():
    ok = isinstance(ranges, list) and len(ranges) <= MAX_LAYERS_HELD
    ok = ok and all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in r) for r in ranges)
    if not ok or not all(0 <= a <= b < MAX_LAYERS_HELD for a, b in ranges):
      raise BadInput(f"{where}[{model_id!r}] must be a list of [first, last] layer ranges within 0..{MAX_LAYERS_HELD - 1}, got {ranges!r}")
    out[model_id] = layer_ranges(layer for a, b in ranges for layer in range(a, b + 1))
  return out


@dataclass(frozen=True)
class DeviceCapabilities:
  """A node's device. `memory` in MB (2**20 bytes), `memory_bandwidth` in GB/s (1e9 bytes/s); 0 means unknown.
  `layer_times` maps a model id to the layer times this node's engine measured for it; `holdings` a model id to the layers whose
  weights the node holds (it runs them without fetching anything); `transfers` are the model files arriving at it."""

  model: str = "Unknown Model"
  chip: str = "Unknown Chip"
  memory: float = 0.0
  flops: DeviceFlops = field(default_factory=DeviceFlops)
  memory_bandwidth: float = 0.0
  layer_times: dict[str, LayerTimes] = field(default_factory=dict, hash=False)
  holdings: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict, hash=False)
  transfers: tuple[FileTransfer, ...] = field(default=(), hash=False)

  def to_dict(self) -> dict:
    out = {"model": self.model, "chip": self.chip, "memory": self.memory, "flops": self.flops.to_dict(), "memory_bandwidth": self.memory_bandwidth}
    if self.layer_times:
      out["layer_times"] = {model_id: times.to_dict() for model_id, times in sorted(self.layer_times.items())}
    if self.holdings:
      out["holdings"] = {model_id: [list(r) for r in ranges] for model_id, ranges in sorted(self.holdings.items())}
    if self.transfers:
      out["transfers"] = [t.to_dict() for t in self.transfers]
    return out

  def held_layers(self, model_id: str) -> frozenset[int]:
    return frozenset(layer for a, b in self.holdings.get(model_id, ()) for layer in range(a, b + 1))

  @staticmethod
  def from_dict(data: dict, where: str = "device") -> "DeviceCapabilities":
    if not isinstance(data, dict):
      raise BadInput(f"{where} must be a JSON object, got {type(data).__name__}")
    reject_unknown_keys(data, {"model", "chip", "memory", "flops", "memory_bandwidth", "layer_times", "holdings", "transfers"}, where)
    flops = data.get("flops", {})
    if not isinstance(flops, dict):
      raise BadInput(f"{where}.flops must be a JSON object with fp32, fp16 and int8, got {flops!r}")
    reject_unknown_keys(flops, {"fp32", "fp16", "int8"}, f"{where}.flops")
    layer_times = data.get("layer_times", {})
    if not isinstance(layer_times, dict) or not all(isinstance(k, str) and k for k in layer_times):
      raise BadInput(f"{where}.layer_times must be a JSON object mapping model ids to decode_ms and token_ms, got {layer_times!r}")
    return DeviceCapabilities(
      model=_string(data.get("model", "Unknown Model"), f"{where}.model"),
      chip=_string(data.get("chip", "Unknown Chip"), f"{where}.chip"),
      memory=non_negative_number(data.get("memory", 0), f"{where}.memory"),
      flops=DeviceFlops(**{k: non_negative_number(flops.get(k, 0), f"{where}.flops.{k}", speed=True) for k in ("fp32", "fp16", "int8")}),
      memory_bandwidth=non_negative_number(data.get("memory_bandwidth", 0), f"{where}.memory_bandwidth", speed=True),
      layer_times={k: LayerTimes.from_dict(v, f"{where}.layer_times[{k!r}]") for k, v in layer_times.items()},
      holdings=_holdings(data.get("holdings", {}), f"{where}.holdings"),
      transfers=tuple(
        FileTransfer.from_dict(t, f"{where}.transfers[{i}]") for i, t in enumerate(_list(data.get("transfers", []), f"{where}.transfers"))
      ),
    )

  def with_layer_times(self, model_id: str, times: LayerTimes) -> "DeviceCapabilities":
    """A copy that also publishes `times` for `model_id`."""
    return replace(self, layer_times={**self.layer_times, model_id: times})


UNKNOWN_DEVICE_CAPABILITIES = DeviceCapabilities()


def _list(value, where: str) -> list:
  if not isinstance(value, list) or len(value) > MAX_TRANSFERS:
    raise BadInput(f"{where} must be a list of at most {MAX_TRANSFERS} entries, got {str(value)[:100]}")
  return value


def reject_unknown_keys(data: dict, allowed: set, where: str) -> None:
  """Raise a BadInput naming the first key of `data` not in `allowed`."""
  for key in data:
    if key not in allowed:
      raise BadInput(f"unknown key {key!r} in {where}; expected one of {', '.join(sorted(allowed))}")


LARGEST = 1e15  # any figure above this (a petabyte in bytes, 10^15 ms, ...) is a mistake, and its arithmetic may overflow
SMALLEST = 1e-9  # a non-zero speed (TFLOPS, GB/s, Mbit/s) below this would make times overflow to infinity


def _string(value, where: str) -> str:
  if not isinstance(value, str):
    raise BadInput(f"{where} must be a string, got {value!r}")
  return unicode_text(value, where)


def unicode_text(value: str, where: str) -> str:
  """`value` if it is valid Unicode (a lone surrogate from JSON's \\ud800 cannot be printed or sent), else a BadInput."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise BadInput(f"{where} must be valid Unicode text, got {value!r}") from None
  return value


def non_negative_number(value, where: str, speed: bool = False) -> float:
  """`value` as a float, or a BadInput if it is not a number in [0, LARGEST]; a `speed` (something times are divided by) must
  also be 0 (unknown) or at least SMALLEST."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise BadInput(f"{where} must be a number, got {value!r}")
  if isinstance(value, int) and abs(value) > LARGEST:
    raise BadInput(f"{where} must be at most {LARGEST:g}, got an integer of {len(str(abs(value)))} digits")
  if math.isnan(value) or value < 0 or value > LARGEST:
    raise BadInput(f"{where} must be a number from 0 to {LARGEST:g}, got {value!r}")
  if speed and 0 < value < SMALLEST:
    raise BadInput(f"{where} must be 0 (unknown) or at least {SMALLEST:g}, got {value!r}")
  return float(value)
