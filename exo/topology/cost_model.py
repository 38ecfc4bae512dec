"""The cost model v2 of docs/DESIGN.md section 2, in index form: per-layer times, layer capacities, hops, and the one evaluation
of a plan (TPOT, throughput, TTFT, feasibility) that every search, `exo plan`, the API and the benchmarks use.

A plan is a ring of node indices in execution order (the first embeds, the last runs the head) with a layer count for each.
Everything here is pure arithmetic on the topology and model spec.
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from exo.base.device_capabilities import DeviceCapabilities
from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.base.topology import Topology

__all__ = [
  "MIN_LAYER_TIME",
  "OBJECTIVES",
  "CostModel",
  "PlannerParams",
  "Prediction",
  "cost_model",
  "device_pacing",
  "head_layers",
  "layer_speed",
  "layer_time",
  "pacing_delay",
  "requests_held",
  "reserved_bytes",
]

MIN_LAYER_TIME = 1e-12  # seconds; keeps a model with no weights and no FLOPs from dividing by zero in the split
OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class PlannerParams:
  memory_headroom: float = 0.1  # fraction of each node's memory kept free for the OS, activations and runtime
  default_rtt_ms: float = 5.0  # assumed for neighbours whose RTT was never measured
  batch: int = 1  # requests each stage runs at once when the ring is saturated (the throughput objective)

  def to_dict(self) -> dict:
    return {"memory_headroom": self.memory_headroom, "default_rtt_ms": self.default_rtt_ms, "batch": self.batch}


@dataclass(frozen=True)
class Prediction:
  tpot_s: float | None  # None when no node's speed is known
  throughput_tps: float | None  # tokens/s of the saturated ring at the planner's batch
  ttft_s: float | None
  feasible: bool
  bound_tpot_s: float | None = None  # latency objective: no plan has a lower TPOT (= tpot_s when the plan is proven optimal)
  bound_throughput_tps: float | None = None  # throughput objective: no plan has more throughput (= throughput_tps when proven)

  def to_dict(self) -> dict:
    def ms(s):
      return None if s is None else s * 1000

    return {
      "tpot_ms": ms(self.tpot_s),
      "tokens_per_second": None if self.tpot_s is None else (math.inf if self.tpot_s == 0 else 1 / self.tpot_s),
      "throughput_tps": self.throughput_tps,
      "ttft_ms": ms(self.ttft_s),
      "feasible": self.feasible,
      "bound_tpot_ms": ms(self.bound_tpot_s),
      "bound_throughput_tps": self.bound_throughput_tps,
    }


def layer_speed(model: ModelSpec, tflops: float, bandwidth_gbs: float, measured=None) -> tuple[float, float] | None:
  """(d, c) seconds of one layer: d for one token, c per token when many run at once, so t(n) = max(d, n c).

  Measured layer times win; else the roofline d = max(F / flops, B / bandwidth), c = F / flops, dropping a term whose
  capability is unknown (0). None when neither is known."""
  if measured is not None:
    return measured.decode_ms / 1000, measured.token_ms / 1000
  compute = model.layer_flops / (tflops * 1e12) if tflops > 0 else None
  streaming = model.layer_bytes / (bandwidth_gbs * 1e9) if bandwidth_gbs > 0 else None
  if compute is None and streaming is None:
    return None
  return max(t for t in (compute, streaming) if t is not None), compute or 0.0


def layer_time(speed: tuple[float, float], tokens: int) -> float:
  """t(n) = max(d, n c): seconds for one layer to run `tokens` tokens at once."""
  return max(speed[0], tokens * speed[1])


def head_layers(model: ModelSpec) -> float:
  """eta = H / B: the final norm and output head cost this many layers of time on the last stage."""
  return model.head_bytes / model.layer_bytes if model.head_bytes > 0 else 0.0


def pacing_delay(shard: Shard, model: ModelSpec, device: DeviceCapabilities, tokens: int = 1) -> float:
  """Seconds `device` needs to run `shard` over `tokens` positions at once: (layers + eta on the last shard) x t(tokens); 0 if
  its speed is unknown."""
  speed = layer_speed(model, device.flops.fp16, device.memory_bandwidth)
  if speed is None:
    return 0.0
  layers = shard.get_layer_count() + (head_layers(model) if shard.is_last_layer() else 0.0)
  return layers * layer_time(speed, tokens)


def device_pacing(model: ModelSpec, device: DeviceCapabilities) -> Callable[[Shard, int], float]:
  """`pacing_delay` of `model` on `device` as a function of (shard, tokens): what a paced engine stretches its calls to."""
  return lambda shard, tokens: pacing_delay(shard, model, device, tokens)


@dataclass
class CostModel:
  """Every per-node and per-pair figure of a topology for one model, objective and parameters; nodes in sorted-id order.

  speed[i]: (d, c) seconds per layer, None when unknown (such a node is charged the slowest t(n) known anywhere in the topology,
  which a model restricted to some nodes keeps); no speed known at all
  means the memory-weighted fallback. hop[i, j]: seconds for one token's hop, inf if i and j are not neighbours.
  transfer[i, j]: seconds to push one token's activation over the link (0 if its bandwidth is unknown).
  """

  node_ids: list[str]
  model: ModelSpec
  params: PlannerParams
  objective: str
  prompt_tokens: int
  context_tokens: int  # C: the context each request's KV is reserved for (v2.1)
  speed: list[tuple[float, float] | None]
  usable_bytes: list[float]  # memory less the headroom
  rtt_s: np.ndarray  # nan where not neighbours
  transfer: np.ndarray
  hop: np.ndarray
  unknown_memory: list[str] = field(default_factory=list)
  known_speeds: list[tuple[float, float]] | None = None  # every known speed of the whole topology (a restricted model keeps them)
  _times: dict = field(default_factory=dict, repr=False)
  _capacity: dict = field(default_factory=dict, repr=False)

  def __post_init__(self):
    if self.known_speeds is None:
      self.known_speeds = [s for s in self.speed if s is not None]

  @property
  def size(self) -> int:
    return len(self.node_ids)

  @property
  def kv_per_layer(self) -> float:
    """K C / N: the KV bytes one request reserves per layer at the planned context (v2.1)."""
    return self.model.kv_bytes_per_layer * self.context_tokens / self.model.context_tokens

  def index(self, node_id: str) -> int:
    return self.node_ids.index(node_id)

  def speed_known(self) -> bool:
    return bool(self.known_speeds)

  def unknown_speed(self) -> list[str]:
    return [n for n, s in zip(self.node_ids, self.speed) if s is None] if self.speed_known() else []

  def times(self, tokens: int) -> list[float]:
    """t_i(tokens) for every node; unknown speed: the slowest known node's t(tokens)."""
    if tokens not in self._times:
      slowest = max(layer_time(s, tokens) for s in self.known_speeds)
      self._times[tokens] = [max(MIN_LAYER_TIME, slowest if s is None else layer_time(s, tokens)) for s in self.speed]
    return self._times[tokens]

  def resident_requests(self, ring_size: int) -> int:
    """c: requests whose KV cache each stage holds: one under latency, k micro-batches of b under throughput."""
    return 1 if self.objective == "latency" else ring_size * self.params.batch

  def capacity(self, i: int, first: bool = False, last: bool = False, ring_size: int = 1) -> int:
    """Layers node i can hold in a ring of `ring_size` nodes, with the embedding if first and the head if last (cached: the
    searches ask for the same few roles many times)."""
    key = (i, bool(first), bool(last), ring_size)
    if key not in self._capacity:
      per_layer = self.model.layer_bytes + self.resident_requests(ring_size) * self.kv_per_layer
      self._capacity[key] = math.floor((self.usable_bytes[i] - reserved_bytes(self.model, first, last)) / per_layer)
    return self._capacity[key]

  def role_capacities(self, ring_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(middle, first, last) capacities of every node in a ring of `ring_size` nodes, as integer arrays."""
    roles = ((False, False), (True, False), (False, True))
    return tuple(np.array([self.capacity(i, first, last, ring_size) for i in range(self.size)], dtype=np.int64) for first, last in roles)

  def ring_capacities(self, ring: list[int]) -> list[int]:
    k = len(ring)
    return [self.capacity(i, n == 0, n == k - 1, k) for n, i in enumerate(ring)]

  def hop_s(self, i: int, j: int, tokens: int = 1) -> float:
    """A hop of `tokens` tokens' activations; a pair with no edge (only in plans from other strategies) is charged the default RTT."""
    rtt = float(self.rtt_s[i, j])
    half = (self.params.default_rtt_ms / 1000 if math.isnan(rtt) else rtt) / 2
    return half + tokens * float(self.transfer[i, j])

  def restrict(self, indices: list[int]) -> "CostModel":
    """The same figures for a subset of the nodes (kept in the given order)."""
    ix = np.ix_(indices, indices)
    return CostModel(
      [self.node_ids[i] for i in indices],
      self.model,
      self.params,
      self.objective,
      self.prompt_tokens,
      self.context_tokens,
      [self.speed[i] for i in indices],
      [self.usable_bytes[i] for i in indices],
      self.rtt_s[ix],
      self.transfer[ix],
      self.hop[ix],
      known_speeds=self.known_speeds,
    )

  def evaluate(self, ring: list[int], layers: list[int]) -> Prediction:
    """The plan's TPOT, throughput at the planner's batch, TTFT for `prompt_tokens` and feasibility (docs/DESIGN.md section 2)."""
    holds = all(1 <= n <= cap for n, cap in zip(layers, self.ring_capacities(ring)))
    feasible = holds and sum(layers) == self.model.n_layers
    if not self.speed_known():
      return Prediction(None, None, None, feasible)
    b, p = self.params.batch, self.prompt_tokens
    return Prediction(self.tpot(ring, layers), b / self.busiest_stage(ring, layers), self._pass_time(ring, layers, p), feasible)

  def _pass_time(self, ring: list[int], layers: list[int], tokens: int) -> float:
    """One pass of `tokens` tokens round the ring: every stage's layers, the head, and (k >= 2) every hop."""
    t = self.times(tokens)
    total = sum(n * t[i] for i, n in zip(ring, layers)) + head_layers(self.model) * t[ring[-1]]
    if len(ring) >= 2:
      total += sum(self.hop_s(i, j, tokens) for i, j in zip(ring, ring[1:] + ring[:1]))
    return total

  def tpot(self, ring: list[int], layers: list[int]) -> float:
    return self._pass_time(ring, layers, 1)

  def stage_constants(self, ring: list[int]) -> list[float]:
    """Per stage, the seconds per batch that do not depend on its layer count: the head on the last stage, the batch's transfer."""
    tb, b = self.times(self.params.batch), self.params.batch
    out = [b * float(self.transfer[i, j]) if len(ring) >= 2 else 0.0 for i, j in zip(ring, ring[1:] + ring[:1])]
    out[-1] += head_layers(self.model) * tb[ring[-1]]
    return out

  def busiest_stage(self, ring: list[int], layers: list[int]) -> float:
    """Seconds the busiest stage takes for one batch: throughput = batch / this."""
    tb = self.times(self.params.batch)
    return max(n * tb[i] + c for i, n, c in zip(ring, layers, self.stage_constants(ring)))

  def warnings(self) -> list[str]:
    memory = [f"node {n!r} has unknown memory (0 MB): it holds no layers" for n in self.unknown_memory]
    if not self.speed_known():
      return memory + ["no node has a known speed (measured layer times, TFLOPS or memory bandwidth): falling back to the memory-weighted split"]
    slowest = max(self.times(1))
    return memory + [
      f"node {n!r} has unknown speed: assumed as slow as the slowest known node ({slowest * 1000:.3f} ms per layer)" for n in self.unknown_speed()
    ]


def reserved_bytes(model: ModelSpec, first: bool, last: bool) -> float:
  """Bytes a stage holds besides its layers: the embedding if first (E), the head if last (H), one matrix if tied and both."""
  if first and last and model.tied_embeddings:
    return max(model.embed_bytes, model.head_bytes)
  return model.embed_bytes * first + model.head_bytes * last


def requests_held(model: ModelSpec, usable_bytes: float, shard: Shard, context_tokens: int) -> int | None:
  """Requests whose KV cache, reserved for `context_tokens` positions (K C / N a layer, v2.1), fit in `usable_bytes` beside the
  shard's layers (and the embedding or head it holds): the most a stage of that node can run at once. None when unbounded: the
  model's KV size or the node's memory is unknown."""
  layers = shard.get_layer_count()
  kv = model.kv_bytes_per_layer * context_tokens / model.context_tokens * layers
  if kv <= 0 or usable_bytes <= 0:
    return None
  free = usable_bytes - reserved_bytes(model, shard.is_first_layer(), shard.is_last_layer()) - layers * model.layer_bytes
  return max(0, math.floor(free / kv))


def cost_model(
  topology: Topology, model: ModelSpec, params: PlannerParams, objective: str = "latency", prompt_tokens: int = 128, context_tokens: int | None = None
) -> CostModel:
  """Derive every per-node and per-pair figure the planner needs, with KV reserved for `context_tokens` per request (default:
  the model's default context, min(N, MAX_CONTEXT)). O(n^2)."""
  ids = sorted(topology.nodes)
  caps = [topology.nodes[i] for i in ids]
  n = len(ids)
  rtt_s = np.full((n, n), math.nan)
  transfer = np.zeros((n, n))
  hop = np.full((n, n), math.inf)
  for i in range(n):
    for j in range(n):
      if i == j or not topology.are_neighbours(ids[i], ids[j]):
        continue
      rtt = topology.pair_rtt_ms(ids[i], ids[j])
      rtt_s[i, j] = (params.default_rtt_ms if rtt is None else rtt) / 1000
      mbps = topology.pair_bandwidth_mbps(ids[i], ids[j])
      transfer[i, j] = model.activation_bytes * 8 / (mbps * 1e6) if mbps else 0.0
      hop[i, j] = rtt_s[i, j] / 2 + transfer[i, j]
  return CostModel(
    node_ids=ids,
    model=model,
    params=params,
    objective=objective,
    prompt_tokens=prompt_tokens,
    context_tokens=model.default_context() if context_tokens is None else context_tokens,
    speed=[layer_speed(model, c.flops.fp16, c.memory_bandwidth, c.layer_times.get(model.id)) for c in caps],
    usable_bytes=[c.memory * 2**20 * (1 - params.memory_headroom) for c in caps],
    rtt_s=rtt_s,
    transfer=transfer,
    hop=hop,
    unknown_memory=[node_id for node_id, c in zip(ids, caps) if c.memory == 0],
  )
