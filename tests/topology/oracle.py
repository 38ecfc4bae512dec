"""Brute-force oracle for the docs/DESIGN.md section 2 cost model, written from the design alone.

It reads the topology and model-spec JSON dicts directly and imports nothing from `exo.topology`, so a bug shared with the
planner's cost model cannot hide here. It enumerates every non-empty subset of nodes, every ring order of it (every
permutation, rotations and reflections included) and every integer layer assignment, so it is only for tiny cases:
O(sum_k C(N, k) * k! * C(L - 1, k - 1)) plans.
"""

import itertools
import math

REL_TIE = 1e-9  # plans whose primary objective is within this relative distance of the best count as tied


def close(a: float, b: float, rel: float) -> bool:
  return abs(a - b) <= rel * max(abs(a), abs(b))


class CostModel:
  """Derived quantities of docs/DESIGN.md section 2 for one (topology, model, headroom, default RTT)."""

  def __init__(self, topology: dict, model: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0):
    self.nodes = topology["nodes"]
    self.edges = topology.get("edges", [])
    self.n_layers = model["n_layers"]
    self.B, self.F, self.A = model["layer_bytes"], model["layer_flops"], model["activation_bytes"]
    self.K = model.get("kv_bytes_per_layer", 0)
    self.h, self.default_rtt_ms = memory_headroom, default_rtt_ms
    self.known_t = {n: t for n in self.nodes if (t := self._known_layer_time(n)) is not None}
    # edges of each unordered pair, looked up once: the enumeration asks for the same pairs many times
    self.pairs = {(u, v): [e for e in self.edges if (e["from"], e["to"]) in ((u, v), (v, u))] for u in self.nodes for v in self.nodes if u != v}

  def _known_layer_time(self, node_id: str) -> float | None:
    node = self.nodes[node_id]
    f, b = node.get("flops", {}).get("fp16", 0), node.get("memory_bandwidth", 0)
    terms = ([self.F / (f * 1e12)] if f else []) + ([self.B / (b * 1e9)] if b else [])
    return max(terms) if terms else None

  def any_known_speed(self) -> bool:
    return bool(self.known_t)

  def layer_time(self, node_id: str) -> float:
    """Seconds per layer per token; a node of unknown speed counts as the slowest known node of the whole topology."""
    return self.known_t[node_id] if node_id in self.known_t else max(self.known_t.values())

  def cap(self, node_id: str) -> int:
    return math.floor(self.nodes[node_id].get("memory", 0) * 2**20 * (1 - self.h) / (self.B + self.K))

  def _pair(self, u: str, v: str) -> list[dict]:
    return self.pairs[(u, v)]

  def adjacent(self, u: str, v: str) -> bool:
    return bool(self._pair(u, v))

  def pair_bandwidth_mbps(self, u: str, v: str) -> float | None:
    given = [e["bandwidth_mbps"] for e in self._pair(u, v) if e.get("bandwidth_mbps") is not None and e["bandwidth_mbps"] > 0]
    return sum(given) / len(given) if given else None

  def transfer(self, u: str, v: str) -> float:
    w = self.pair_bandwidth_mbps(u, v)
    return self.A * 8 / (w * 1e6) if w is not None else 0.0

  def hop(self, u: str, v: str) -> float:
    pair = self._pair(u, v)
    assert pair, f"{u} and {v} are not neighbours"
    rtts = [e["rtt_ms"] for e in pair if e.get("rtt_ms") is not None]
    r = sum(rtts) / len(rtts) if rtts else self.default_rtt_ms
    return r / 2 / 1000 + self.transfer(u, v)

  def evaluate(self, ring: list[tuple[str, int]]) -> tuple[float, float]:
    """(TPOT seconds, throughput tokens/s) of a ring [(node id, layer count), ...] in execution order."""
    k = len(ring)
    tpot = sum(count * self.layer_time(n) for n, count in ring)
    stages = [count * self.layer_time(n) for n, count in ring]
    if k >= 2:
      ids = [n for n, _ in ring]
      nexts = ids[1:] + ids[:1]
      tpot += sum(self.hop(u, v) for u, v in zip(ids, nexts, strict=True))
      stages = [s + self.transfer(u, v) for s, u, v in zip(stages, ids, nexts, strict=True)]
    return tpot, 1 / max(stages)

  def feasible_plans(self):
    """Every feasible ring: yields [(node id, layer count), ...]."""
    ids, n = list(self.nodes), self.n_layers
    caps = {i: self.cap(i) for i in ids}
    for k in range(1, len(ids) + 1):
      for subset in itertools.combinations(ids, k):
        for order in itertools.permutations(subset):
          if k >= 2 and not all(self.adjacent(order[i], order[(i + 1) % k]) for i in range(k)):
            continue
          # cut points 0 < c_1 < ... < c_{k-1} < n give every composition of n into k positive parts
          for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            counts = [bounds[i + 1] - bounds[i] for i in range(k)]
            if all(1 <= c <= caps[i] for i, c in zip(order, counts, strict=True)):
              yield list(zip(order, counts, strict=True))


def oracle(topology: dict, model: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0) -> dict | None:
  """Best values over every feasible plan, or None when no plan is feasible.

  Returns {"best_tpot", "throughput_at_best_tpot", "best_throughput", "tpot_at_best_throughput", "n_plans"}: the secondary
  values are the best among plans whose primary is within REL_TIE of the best (the objective's tie-break).
  """
  cm = CostModel(topology, model, memory_headroom, default_rtt_ms)
  assert cm.any_known_speed(), "the oracle does not model the memory-weighted fallback"
  values = [cm.evaluate(ring) for ring in cm.feasible_plans()]
  if not values:
    return None
  best_tpot = min(t for t, _ in values)
  best_thr = max(x for _, x in values)
  return {
    "best_tpot": best_tpot,
    "throughput_at_best_tpot": max(x for t, x in values if close(t, best_tpot, REL_TIE)),
    "best_throughput": best_thr,
    "tpot_at_best_throughput": min(t for t, x in values if close(x, best_thr, REL_TIE)),
    "n_plans": len(values),
  }


def evaluate_plan(topology: dict, model: dict, plan: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0) -> tuple[float, float]:
  """(TPOT seconds, throughput tokens/s) of a plan JSON object's shards, recomputed from the topology."""
  cm = CostModel(topology, model, memory_headroom, default_rtt_ms)
  ring = [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]
  return cm.evaluate(ring)


def check_predicted(topology: dict, model: dict, plan: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0, rel: float = 1e-6) -> None:
  """Assert the plan's `predicted` numbers agree with the oracle's evaluation of its shards."""
  tpot, throughput = evaluate_plan(topology, model, plan, memory_headroom, default_rtt_ms)
  p = plan["predicted"]
  assert close(p["tpot_ms"], tpot * 1000, rel), f"tpot_ms {p['tpot_ms']!r} != {tpot * 1000!r}"
  assert close(p["tokens_per_second"], 1 / tpot, rel), f"tokens_per_second {p['tokens_per_second']!r} != {1 / tpot!r}"
  assert close(p["throughput_tps"], throughput, rel), f"throughput_tps {p['throughput_tps']!r} != {throughput!r}"
