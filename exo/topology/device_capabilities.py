"""What a device can do: memory, peak TFLOPS per precision and memory bandwidth."""

import math
from dataclasses import asdict, dataclass, field, replace

from exo.errors import PlanError


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
      raise PlanError(f"{where} must be a JSON object with decode_ms and token_ms, got {data!r}")
    reject_unknown_keys(data, {"decode_ms", "token_ms"}, where)
    for key in ("decode_ms", "token_ms"):
      if key not in data:
        raise PlanError(f"{where} is missing {key!r}")
    decode_ms = non_negative_number(data["decode_ms"], f"{where}.decode_ms")
    if decode_ms <= 0:
      raise PlanError(f"{where}.decode_ms must be > 0, got {data['decode_ms']!r}")
    return LayerTimes(decode_ms, non_negative_number(data["token_ms"], f"{where}.token_ms"))


@dataclass(frozen=True)
class DeviceCapabilities:
  """A node's device. `memory` in MB (2**20 bytes), `memory_bandwidth` in GB/s (1e9 bytes/s); 0 means unknown.
  `layer_times` maps a model id to the layer times this node's engine measured for it."""

  model: str = "Unknown Model"
  chip: str = "Unknown Chip"
  memory: float = 0.0
  flops: DeviceFlops = field(default_factory=DeviceFlops)
  memory_bandwidth: float = 0.0
  layer_times: dict[str, LayerTimes] = field(default_factory=dict, hash=False)

  def to_dict(self) -> dict:
    out = {"model": self.model, "chip": self.chip, "memory": self.memory, "flops": self.flops.to_dict(), "memory_bandwidth": self.memory_bandwidth}
    if self.layer_times:
      out["layer_times"] = {model_id: times.to_dict() for model_id, times in sorted(self.layer_times.items())}
    return out

  @staticmethod
  def from_dict(data: dict, where: str = "device") -> "DeviceCapabilities":
    if not isinstance(data, dict):
      raise PlanError(f"{where} must be a JSON object, got {type(data).__name__}")
    reject_unknown_keys(data, {"model", "chip", "memory", "flops", "memory_bandwidth", "layer_times"}, where)
    flops = data.get("flops", {})
    if not isinstance(flops, dict):
      raise PlanError(f"{where}.flops must be a JSON object with fp32, fp16 and int8, got {flops!r}")
    reject_unknown_keys(flops, {"fp32", "fp16", "int8"}, f"{where}.flops")
    layer_times = data.get("layer_times", {})
    if not isinstance(layer_times, dict) or not all(isinstance(k, str) and k for k in layer_times):
      raise PlanError(f"{where}.layer_times must be a JSON object mapping model ids to decode_ms and token_ms, got {layer_times!r}")
    return DeviceCapabilities(
      model=_string(data.get("model", "Unknown Model"), f"{where}.model"),
      chip=_string(data.get("chip", "Unknown Chip"), f"{where}.chip"),
      memory=non_negative_number(data.get("memory", 0), f"{where}.memory"),
      flops=DeviceFlops(**{k: non_negative_number(flops.get(k, 0), f"{where}.flops.{k}") for k in ("fp32", "fp16", "int8")}),
      memory_bandwidth=non_negative_number(data.get("memory_bandwidth", 0), f"{where}.memory_bandwidth"),
      layer_times={k: LayerTimes.from_dict(v, f"{where}.layer_times[{k!r}]") for k, v in layer_times.items()},
    )

  def with_layer_times(self, model_id: str, times: LayerTimes) -> "DeviceCapabilities":
    """A copy that also publishes `times` for `model_id`."""
    return replace(self, layer_times={**self.layer_times, model_id: times})


UNKNOWN_DEVICE_CAPABILITIES = DeviceCapabilities()


def reject_unknown_keys(data: dict, allowed: set, where: str) -> None:
  """Raise a PlanError naming the first key of `data` not in `allowed`."""
  for key in data:
    if key not in allowed:
      raise PlanError(f"unknown key {key!r} in {where}; expected one of {', '.join(sorted(allowed))}")


def _string(value, where: str) -> str:
  if not isinstance(value, str):
    raise PlanError(f"{where} must be a string, got {value!r}")
  return value


def non_negative_number(value, where: str) -> float:
  """`value` as a float, or a PlanError if it is not a finite number >= 0."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value) or value < 0:
    raise PlanError(f"{where} must be a finite number >= 0, got {value!r}")
  return float(value)
