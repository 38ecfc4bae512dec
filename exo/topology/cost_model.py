"""The v1 cost model of docs/DESIGN.md section 2: per-layer times, layer capacities, hop times, and the predictions for any plan.

A plan is a ring `[(node_id, layers), ...]` in execution order. Everything here is pure arithmetic on the topology and model spec.
"""

import math
from dataclasses import dataclass, field

from exo.topology.model_spec import ModelSpec
from exo.topology.topology import Topology

MIN_LAYER_TIME = 1e-12  # seconds; keeps a model with no weights and no FLOPs from dividing by zero in the split


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
  bottleneck_s: float | None  # busiest stage's time per token; throughput = 1 / bottleneck
  ttft_s: float | None
  feasible: bool

  def to_dict(self) -> dict:
    def ms(s):
      return None if s is None else s * 1000

    def per_second(s):
      return None if s is None else (math.inf if s == 0 else 1 / s)

    return {
      "tpot_ms": ms(self.tpot_s),
      "tokens_per_second": per_second(self.tpot_s),
      "throughput_tps": per_second(self.bottleneck_s),
      "ttft_ms": ms(self.ttft_s),
      "feasible": self.feasible,
    }


@dataclass
class ClusterCosts:
  """Derived figures for one topology and model, nodes indexed in sorted-id order.

  layer_time[i]: seconds per layer per decoded token (roofline, unknown speed -> slowest known); None for all if no speed is known.
  capacity[i]: layers node i can hold. hop[i][j]: seconds per hop, None if i and j are not neighbours.
  transfer[i][j]: seconds to push one token's activation over the link (0 if the bandwidth is unknown).
  """

  node_ids: list[str]
  model: ModelSpec
  params: PlannerParams
  layer_time: list[float] | None
  capacity: list[int]
  hop: list[list[float | None]]
  transfer: list[list[float]]
  unknown_speed: list[str] = field(default_factory=list)
  unknown_memory: list[str] = field(default_factory=list)
  flops: list[float] = field(default_factory=list)
  bandwidth: list[float] = field(default_factory=list)
  rtt_s: list[list[float | None]] = field(default_factory=list)
  link_mbps: list[list[float | None]] = field(default_factory=list)

  def index(self, node_id: str) -> int:
    return self.node_ids.index(node_id)

  def warnings(self) -> list[str]:
    memory = [f"node {n!r} has unknown memory (0 MB): it holds no layers" for n in self.unknown_memory]
    if self.layer_time is None:
      return memory + ["no node has a known speed (TFLOPS or memory bandwidth): falling back to the memory-weighted split"]
    slowest = max(self.layer_time)
    return memory + [
      f"node {n!r} has unknown speed: assumed as slow as the slowest known node ({slowest * 1000:.3f} ms per layer)" for n in self.unknown_speed
    ]


def roofline_layer_time(layer_flops: float, layer_bytes: float, tflops: float, bandwidth_gbs: float) -> float | None:
  """max(compute time, weight-streaming time) for one layer, dropping a term whose capability is unknown (0); None if both are."""
  terms = []
  if tflops > 0:
    terms.append(layer_flops / (tflops * 1e12))
  if bandwidth_gbs > 0:
    terms.append(layer_bytes / (bandwidth_gbs * 1e9))
  return max(terms) if terms else None


def layer_capacity(memory_mb: float, model: ModelSpec, memory_headroom: float) -> int:
  return math.floor(memory_mb * 2**20 * (1 - memory_headroom) / (model.layer_bytes + model.kv_bytes_per_layer))


def _transfer_s(activation_bytes: float, bandwidth_mbps: float | None) -> float:
  return activation_bytes * 8 / (bandwidth_mbps * 1e6) if bandwidth_mbps else 0.0


def cluster_costs(topology: Topology, model: ModelSpec, params: PlannerParams) -> ClusterCosts:
  """Derive every per-node and per-pair figure the planner needs. O(n^2)."""
  ids = sorted(topology.nodes)
  caps = [topology.nodes[i] for i in ids]
  flops = [c.flops.fp16 for c in caps]
  bandwidth = [c.memory_bandwidth for c in caps]
  known = [roofline_layer_time(model.layer_flops, model.layer_bytes, f, b) for f, b in zip(flops, bandwidth)]
  known_times = [t for t in known if t is not None]
  layer_time = None
  if known_times:
    slowest = max(known_times)
    layer_time = [max(MIN_LAYER_TIME, slowest if t is None else t) for t in known]
  n = len(ids)
  rtt_s = [[None] * n for _ in range(n)]
  link_mbps = [[None] * n for _ in range(n)]
  hop = [[None] * n for _ in range(n)]
  transfer = [[0.0] * n for _ in range(n)]
  for i in range(n):
    for j in range(n):
      if i == j or not topology.are_neighbours(ids[i], ids[j]):
        continue
      rtt = topology.pair_rtt_ms(ids[i], ids[j])
      rtt_s[i][j] = (params.default_rtt_ms if rtt is None else rtt) / 1000
      link_mbps[i][j] = topology.pair_bandwidth_mbps(ids[i], ids[j])
      transfer[i][j] = _transfer_s(model.activation_bytes, link_mbps[i][j])
      hop[i][j] = rtt_s[i][j] / 2 + transfer[i][j]
  return ClusterCosts(
    node_ids=ids,
    model=model,
    params=params,
    layer_time=layer_time,
    capacity=[layer_capacity(c.memory, model, params.memory_headroom) for c in caps],
    hop=hop,
    transfer=transfer,
    unknown_speed=[ids[i] for i, t in enumerate(known) if t is None] if known_times else [],
    unknown_memory=[node_id for node_id, c in zip(ids, caps) if c.memory == 0],
    flops=flops,
    bandwidth=bandwidth,
    rtt_s=rtt_s,
    link_mbps=link_mbps,
  )


def _hop_or_default(costs: ClusterCosts, i: int, j: int) -> float:
  """A hop between ring neighbours; a pair with no edge (only in plans from other strategies) is charged the default RTT."""
  hop = costs.hop[i][j]
  return costs.params.default_rtt_ms / 2000 + costs.transfer[i][j] if hop is None else hop


def ring_tpot(costs: ClusterCosts, ring: list[int], layers: list[int]) -> float:
  compute = sum(n * costs.layer_time[i] for i, n in zip(ring, layers))
  if len(ring) < 2:
    return compute
  return compute + sum(_hop_or_default(costs, ring[k], ring[(k + 1) % len(ring)]) for k in range(len(ring)))


def ring_bottleneck(costs: ClusterCosts, ring: list[int], layers: list[int]) -> float:
  if len(ring) < 2:
    return layers[0] * costs.layer_time[ring[0]]
  return max(n * costs.layer_time[i] + costs.transfer[i][ring[(k + 1) % len(ring)]] for k, (i, n) in enumerate(zip(ring, layers)))


def ring_ttft(costs: ClusterCosts, ring: list[int], layers: list[int], prompt_tokens: int) -> float:
  """Prefill of `prompt_tokens` tokens: compute scales with the prompt, weight streaming does not; each hop carries the whole prompt."""
  m = costs.model
  per_layer = [roofline_layer_time(prompt_tokens * m.layer_flops, m.layer_bytes, costs.flops[i], costs.bandwidth[i]) for i in ring]
  known = [t for t in per_layer if t is not None]
  slowest = max(known) if known else 0.0
  total = sum(n * (slowest if t is None else t) for t, n in zip(per_layer, layers))
  if len(ring) < 2:
    return total
  for k, i in enumerate(ring):
    j = ring[(k + 1) % len(ring)]
    rtt = costs.rtt_s[i][j] if costs.rtt_s[i][j] is not None else costs.params.default_rtt_ms / 1000
    total += rtt / 2 + _transfer_s(prompt_tokens * m.activation_bytes, costs.link_mbps[i][j])
  return total


def predict(costs: ClusterCosts, ring: list[int], layers: list[int], prompt_tokens: int) -> Prediction:
  """TPOT, bottleneck, TTFT and feasibility (every node's layers within its capacity) of a plan given as node indices and layer counts."""
  feasible = all(1 <= n <= costs.capacity[i] for i, n in zip(ring, layers))
  if costs.layer_time is None:
    return Prediction(None, None, None, feasible)
  return Prediction(ring_tpot(costs, ring, layers), ring_bottleneck(costs, ring, layers), ring_ttft(costs, ring, layers, prompt_tokens), feasible)
