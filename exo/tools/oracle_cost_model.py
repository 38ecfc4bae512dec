"""Cost model v2 of docs/DESIGN.md section 2, written from the design alone: the one independent cost model behind the oracles
(exo/tools/plan_oracle.py enumerates every plan, exo/tools/exact_oracle.py finds the optimum by Held-Karp).

It reads the topology and model-spec JSON dicts directly and imports nothing from `exo.topology`, so a bug shared with the
planner's cost model cannot hide here. Set-up is O(N^2 + N * E) for N nodes and E edges; every figure of a ring is O(k).

v2 in one place (DESIGN.md section 2 is authoritative; the names follow it):
- t_i(n) = max(d_i, n * c_i): from the node's `layer_times` for the served model id if present (decode_ms, token_ms in ms),
  else the roofline d_i = max(F / f_i, B / b_i), c_i = F / f_i over the known terms (c_i = 0 when f_i is unknown); a node
  with neither takes, for each n separately, the largest t_j(n) over the nodes j of known speed.
- eta = H / B layers of time on the last stage (0 when H = 0).
- c = 1 resident request under `latency`, k * b under `throughput`; cap_i = floor((M_i * 2**20 * (1 - h) - E [first]
  - H [last]) / (B + c * K)), subtracting max(E, H) once when the embeddings are tied and one node is first and last.
- v2.1: K is the model's KV for its context N (`context_tokens`, default 8192); a plan at context C reserves K * C / N. C is
  min(N, 8192, the user's cap) when some plan is feasible there, else the largest multiple of 256, at least 512, at which one
  is (none below 512).
- hop_uv(n) = r_uv / 2000 + n * A * 8 / (w_uv * 1e6) (the transfer term only when a bandwidth is given).
- TPOT = sum L_i t_i(1) + eta t_last(1) + (k >= 2: every ring hop, last -> first included, with n = 1).
- throughput = b / max_i (L_i t_i(b) + [i last] eta t_i(b) + (k >= 2: b * A * 8 / (w to the next node * 1e6))).
- TTFT(P) = sum L_i t_i(P) + eta t_last(P) + (k >= 2: every ring hop with n = P).
"""

import math

__all__ = [
  "CONTEXT_STEP",
  "DEFAULT_CONTEXT",
  "DEFAULT_PROMPT_TOKENS",
  "LEAST_CONTEXT",
  "OBJECTIVES",
  "OracleCostModel",
  "check_predicted",
  "close",
  "evaluate_plan",
  "plan_ring",
  "planned_context",
]

DEFAULT_PROMPT_TOKENS = 128  # the prompt length behind the plan JSON's `ttft_ms`
DEFAULT_CONTEXT, CONTEXT_STEP, LEAST_CONTEXT = 8192, 256, 512  # v2.1's context cap, step and floor, in tokens
OBJECTIVES = ("latency", "throughput")


def close(a: float, b: float, rel: float) -> bool:
  return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


class OracleCostModel:
  """Derived quantities of docs/DESIGN.md section 2 (v2) for one (topology, model, headroom, default RTT, batch).

  A ring is a list [(node id, layer count), ...] in execution order: the first entry embeds, the last runs the head.
  """

  def __init__(
    self, topology: dict, model: dict, memory_headroom: float = 0.1, default_rtt_ms: float = 5.0, batch: int = 1, context_tokens: int | None = None
  ):
    self.nodes = topology["nodes"]
    self.edges = topology.get("edges", [])
    self.model_id = model["id"]
    self.n_layers = model["n_layers"]
    self.B, self.F, self.A = model["layer_bytes"], model["layer_flops"], model["activation_bytes"]
    self.full_K, self.N = model.get("kv_bytes_per_layer", 0), model.get("context_tokens", DEFAULT_CONTEXT)
    self.context = min(self.N, DEFAULT_CONTEXT) if context_tokens is None else context_tokens
    self.E, self.H = model.get("embed_bytes", 0), model.get("head_bytes", 0)
    self.tied = model.get("tied_embeddings", False)
    self.eta = self.H / self.B if self.H else 0.0
    self.h, self.default_rtt_ms, self.batch = memory_headroom, default_rtt_ms, batch
    # (d_i, c_i) in seconds for every node of known speed
    self.speed = {n: s for n in self.nodes if (s := self._own_speed(n)) is not None}
    # edges of each unordered pair, looked up once: the enumeration asks for the same pairs many times
    self.pairs = {(u, v): [e for e in self.edges if (e["from"], e["to"]) in ((u, v), (v, u))] for u in self.nodes for v in self.nodes if u != v}
    self.rtt_ms = {pair: self._mean_rtt_ms(edges) for pair, edges in self.pairs.items()}
    self.bandwidth_mbps = {pair: self._mean_bandwidth_mbps(edges) for pair, edges in self.pairs.items()}
    self._t = {}  # (node id, n) -> t_i(n), memoised

  @property
  def context(self) -> int:
    return self._context

  @context.setter
  def context(self, tokens: int) -> None:
    """Plans reserve KV for `tokens` per request from now on: K becomes the model's K * tokens / N."""
    self._context, self.K = tokens, self.full_K * tokens / self.N

  # ---------- per node ----------

  def _own_speed(self, node_id: str) -> tuple[float, float] | None:
    """(d_i, c_i) from the node's measured layer_times for the served model, else its roofline; None if neither is known."""
    node = self.nodes[node_id]
    measured = node.get("layer_times", {}).get(self.model_id)
    if measured is not None:
      return measured["decode_ms"] / 1000, measured["token_ms"] / 1000
    f, b = node.get("flops", {}).get("fp16", 0), node.get("memory_bandwidth", 0)
    compute = [self.F / (f * 1e12)] if f else []
    streaming = [self.B / (b * 1e9)] if b else []
    if not compute and not streaming:
      return None
    return max(compute + streaming), (compute[0] if compute else 0.0)

  def known_speed(self, node_id: str) -> bool:
    return node_id in self.speed

  def any_known_speed(self) -> bool:
    return bool(self.speed)

  def t(self, node_id: str, n: int) -> float:
    """Seconds for one layer on `node_id` with n tokens at once; unknown speed: the slowest known node's t_j(n), for this n."""
    key = (node_id, n)
    if key not in self._t:
      if node_id in self.speed:
        d, c = self.speed[node_id]
        self._t[key] = max(d, n * c)
      else:
        self._t[key] = max(self.t(j, n) for j in self.speed)
    return self._t[key]

  def resident_requests(self, objective: str, k: int) -> int:
    """c: requests whose KV cache every stage holds; 1 under latency, k micro-batches of b under throughput."""
    assert objective in OBJECTIVES, objective
    return 1 if objective == "latency" else k * self.batch

  def reserved_bytes(self, first: bool, last: bool) -> float:
    """Embedding bytes on the first stage, head bytes on the last; a tied matrix is held once by a node that is both."""
    if first and last and self.tied:
      return max(self.E, self.H)
    return (self.E if first else 0) + (self.H if last else 0)

  def cap_quotient(self, node_id: str, first: bool, last: bool, k: int, objective: str) -> float:
    """The capacity before the floor: layers' worth of usable memory for this role, ring length and objective."""
    usable = self.nodes[node_id].get("memory", 0) * 2**20 * (1 - self.h) - self.reserved_bytes(first, last)
    return usable / (self.B + self.resident_requests(objective, k) * self.K)

  def cap(self, node_id: str, first: bool, last: bool, k: int, objective: str) -> int:
    """Layers `node_id` can hold as a stage of a k-node ring (first: it embeds; last: it holds the head) under `objective`."""
    return math.floor(self.cap_quotient(node_id, first, last, k, objective))

  def ring_caps(self, ids: list[str] | tuple[str, ...], objective: str) -> list[int]:
    k = len(ids)
    return [self.cap(n, p == 0, p == k - 1, k, objective) for p, n in enumerate(ids)]

  # ---------- per pair ----------

  def _pair(self, u: str, v: str) -> list[dict]:
    return self.pairs[(u, v)]

  def adjacent(self, u: str, v: str) -> bool:
    return bool(self._pair(u, v))

  def _mean_rtt_ms(self, edges: list[dict]) -> float:
    """r_uv: the mean RTT of the edges u->v and v->u that measured one, default_rtt_ms if none did."""
    rtts = [e["rtt_ms"] for e in edges if e.get("rtt_ms") is not None]
    return sum(rtts) / len(rtts) if rtts else self.default_rtt_ms

  def _mean_bandwidth_mbps(self, edges: list[dict]) -> float | None:
    """w_uv: the mean of the bandwidths given (> 0) on the edges u->v and v->u; None if none is."""
    given = [e["bandwidth_mbps"] for e in edges if e.get("bandwidth_mbps") is not None and e["bandwidth_mbps"] > 0]
    return sum(given) / len(given) if given else None

  def pair_rtt_ms(self, u: str, v: str) -> float:
    return self.rtt_ms[(u, v)]

  def pair_bandwidth_mbps(self, u: str, v: str) -> float | None:
    return self.bandwidth_mbps[(u, v)]

  def transfer(self, u: str, v: str, n: int) -> float:
    """Seconds to push n tokens' hidden states from u to v; 0 when the link's bandwidth is unknown."""
    w = self.pair_bandwidth_mbps(u, v)
    return n * self.A * 8 / (w * 1e6) if w is not None else 0.0

  def hop(self, u: str, v: str, n: int) -> float:
    assert self.adjacent(u, v), f"{u} and {v} are not neighbours"
    return self.pair_rtt_ms(u, v) / 2 / 1000 + self.transfer(u, v, n)

  # ---------- per ring ----------

  def hops(self, ids: list[str] | tuple[str, ...], n: int) -> float:
    """Every hop of the ring of `ids` with n tokens, last -> first included; none for one node."""
    if len(ids) < 2:
      return 0.0
    return sum(self.hop(u, v, n) for u, v in zip(ids, ids[1:] + ids[:1], strict=True))

  def _time_through(self, ring: list[tuple[str, int]], n: int) -> float:
    """sum L_i t_i(n) + eta t_last(n) + (k >= 2: every hop with n tokens): TPOT for n = 1, TTFT for n = P."""
    ids = [node_id for node_id, _ in ring]
    layers = sum(count * self.t(node_id, n) for node_id, count in ring)
    return layers + self.eta * self.t(ids[-1], n) + self.hops(ids, n)

  def tpot(self, ring: list[tuple[str, int]]) -> float:
    return self._time_through(ring, 1)

  def ttft(self, ring: list[tuple[str, int]], prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> float:
    return self._time_through(ring, prompt_tokens)

  def throughput(self, ring: list[tuple[str, int]]) -> float:
    """Tokens/s of the saturated pipeline: b tokens per cycle of the busiest stage (its layers, the head if last, its send)."""
    b, k = self.batch, len(ring)
    ids = [node_id for node_id, _ in ring]
    stages = []
    for p, (node_id, count) in enumerate(ring):
      stage = count * self.t(node_id, b)
      if p == k - 1:
        stage += self.eta * self.t(node_id, b)
      if k >= 2:
        stage += self.transfer(node_id, ids[(p + 1) % k], b)
      stages.append(stage)
    slowest = max(stages)
    return b / slowest if slowest > 0 else math.inf

  def evaluate(self, ring: list[tuple[str, int]]) -> tuple[float, float]:
    """(TPOT seconds, throughput tokens/s at batch b) of a ring."""
    return self.tpot(ring), self.throughput(ring)

  def feasible(self, ring: list[tuple[str, int]], objective: str) -> bool:
    """Every stage holds at least one layer and no more than its capacity (adjacency is not part of this)."""
    caps = self.ring_caps([node_id for node_id, _ in ring], objective)
    return all(1 <= count <= cap for (_, count), cap in zip(ring, caps, strict=True))


def planned_context(model: dict, feasible_at, max_context: int | None = None) -> int | None:
  """v2.1's context: the cap min(N, 8192, max_context) if `feasible_at(cap)`, else the largest multiple of 256, at least 512,
  for which it is (tried from the top down, every one); None if none is."""
  cap = min(model.get("context_tokens", DEFAULT_CONTEXT), DEFAULT_CONTEXT, max_context or DEFAULT_CONTEXT)
  if feasible_at(cap):
    return cap
  if not model.get("kv_bytes_per_layer", 0):
    return None
  for tokens in range((cap - 1) // CONTEXT_STEP * CONTEXT_STEP, LEAST_CONTEXT - 1, -CONTEXT_STEP):
    if feasible_at(tokens):
      return tokens
  return None


def plan_ring(plan: dict) -> list[tuple[str, int]]:
  """[(node id, layer count), ...] of a plan JSON object's shards, in ring order."""
  return [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]


def evaluate_plan(
  topology: dict,
  model: dict,
  plan: dict,
  memory_headroom: float = 0.1,
  default_rtt_ms: float = 5.0,
  batch: int = 1,
  objective: str | None = None,
  prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
) -> dict:
  """{"tpot_s", "throughput_tps", "ttft_s", "feasible"} of a plan JSON object's shards, recomputed from the topology.

  Feasibility uses the capacities of `objective` (default: the plan's own objective) at the plan's context."""
  cm = OracleCostModel(topology, model, memory_headroom, default_rtt_ms, batch, plan.get("context_tokens"))
  ring = plan_ring(plan)
  tpot, throughput = cm.evaluate(ring)
  return {
    "tpot_s": tpot,
    "throughput_tps": throughput,
    "ttft_s": cm.ttft(ring, prompt_tokens),
    "feasible": cm.feasible(ring, objective or plan["objective"]),
  }


def check_predicted(topology: dict, model: dict, plan: dict, rel: float = 1e-6, **evaluation) -> None:
  """Assert the plan's `predicted` numbers (TPOT, tokens/s, throughput, TTFT, feasible) agree with the oracle's evaluation;
  `evaluation`: evaluate_plan's keyword parameters (headroom, default RTT, batch, objective, prompt tokens)."""
  want = evaluate_plan(topology, model, plan, **evaluation)
  tpot, throughput, ttft = want["tpot_s"], want["throughput_tps"], want["ttft_s"]
  p = plan["predicted"]
  assert close(p["tpot_ms"], tpot * 1000, rel), f"tpot_ms {p['tpot_ms']!r} != {tpot * 1000!r}"
  assert close(p["tokens_per_second"], 1 / tpot, rel), f"tokens_per_second {p['tokens_per_second']!r} != {1 / tpot!r}"
  assert close(p["throughput_tps"], throughput, rel), f"throughput_tps {p['throughput_tps']!r} != {throughput!r}"
  assert close(p["ttft_ms"], ttft * 1000, rel), f"ttft_ms {p['ttft_ms']!r} != {ttft * 1000!r}"
  assert p["feasible"] is want["feasible"], f"feasible {p['feasible']!r} != {want['feasible']!r}"
