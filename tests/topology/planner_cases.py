"""Random planning cases for the planner's property tests, and the checks they share: hypothesis strategies that draw a topology,
a model spec and planner parameters as the JSON dicts `make_plan` and the oracles of exo/tools read, and the check that a plan
is feasible, written against exo/tools/oracle_cost_model.py."""

import math

from hypothesis import assume
from hypothesis import strategies as st

from exo.tools.oracle_cost_model import OBJECTIVES, OracleCostModel

DEFAULT_HEADROOM, DEFAULT_RTT_MS, DEFAULT_BATCH = 0.1, 5.0, 1
MODEL_ID = "m"
FLOOR_MARGIN = 1e-6  # every capacity quotient stays this far (relative, at least absolute) from an integer


def log_floats(lo: float, hi: float, digits: int = 4):
  """Roughly log-uniform floats in [lo, hi], rounded to `digits` significant digits: magnitudes matter more than digits here."""
  return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: float(f"{10**e:.{digits}g}"))


def clear_of_integers(q: float) -> bool:
  return abs(q - round(q)) > FLOOR_MARGIN * max(1.0, abs(q))


def oracle_params(case: dict) -> dict:
  p = case["params"]
  return {
    "memory_headroom": p.get("memory_headroom", DEFAULT_HEADROOM),
    "default_rtt_ms": p.get("default_rtt_ms", DEFAULT_RTT_MS),
    "batch": p.get("batch", DEFAULT_BATCH),
  }


def cost_model(case: dict) -> OracleCostModel:
  return OracleCostModel(case["topology"], case["model"], **oracle_params(case))


def _model(draw, max_layers: int) -> dict:
  """A model spec of 1..max_layers layers, with or without KV cache, embedding and head bytes of a few layers' size, tied or not."""
  n_layers = draw(st.integers(1, max_layers))
  kv = draw(st.sampled_from([0.0, None]) | log_floats(1e5, 1e8))
  model = {
    "id": MODEL_ID,
    "n_layers": n_layers,
    "layer_bytes": draw(log_floats(1e6, 1e9)),
    "layer_flops": draw(log_floats(1e8, 1e11)),
    "activation_bytes": draw(log_floats(1e3, 1e7)),
  }
  B = model["layer_bytes"]
  if kv is not None:
    model["kv_bytes_per_layer"] = kv
  embed = draw(st.sampled_from([None, 0.0]) | log_floats(0.2, 4).map(lambda x: x * B))
  if embed is not None:
    model["embed_bytes"] = embed
  head = draw(st.sampled_from([None, 0.0, "embed"]) | log_floats(0.2, 4).map(lambda x: x * B))
  if head is not None:
    model["head_bytes"] = model.get("embed_bytes", 0.0) if head == "embed" else head
  tied = draw(st.sampled_from([None, False, True]))
  if tied is not None:
    model["tied_embeddings"] = tied
  return model


def _params(draw) -> dict:
  """Planner parameters, each left at its default or drawn."""
  params = {}
  headroom = draw(st.sampled_from([None, 0.0, 0.1, 0.3]))
  if headroom is not None:
    params["memory_headroom"] = headroom
  rtt = draw(st.sampled_from([None, 0.0, 1.0, 20.0]))
  if rtt is not None:
    params["default_rtt_ms"] = rtt
  batch = draw(st.sampled_from([None, 1, 2, 3, 4, 5, 6, 7, 8]))
  if batch is not None:
    params["batch"] = batch
  return params


def _node(draw, num, model: dict, params: dict, n_nodes: int) -> dict:
  """A node whose memory is worth cap + frac layers for one role (what it reserves for the embedding and head) and one count of
  resident requests (1 under latency, k * b under throughput); the other roles' and counts' capacities follow from it. Its
  speed may be unknown; measured layer_times for the served model on some nodes, sometimes for another one that must be ignored."""
  B, K = model["layer_bytes"], model.get("kv_bytes_per_layer", 0.0)
  E, H = model.get("embed_bytes", 0.0), model.get("head_bytes", 0.0)
  h, b = params.get("memory_headroom", DEFAULT_HEADROOM), params.get("batch", DEFAULT_BATCH)
  cap = draw(st.integers(0, model["n_layers"]))
  frac = draw(st.floats(0.1, 0.9))
  resident = draw(st.sampled_from([1] + [k * b for k in range(1, n_nodes + 1)]))
  reserved = draw(st.sampled_from([0.0, E, H, E + H]))
  memory = ((cap + frac) * (B + resident * K) + reserved) / (2**20 * (1 - h))
  fp16 = draw(st.just(0.0) | num(0.5, 200))
  bandwidth = draw(st.just(0.0) | num(20, 1000))
  node = {
    "model": "dev",
    "chip": "chip",
    "memory": memory,
    "flops": {"fp32": fp16 / 2, "fp16": fp16, "int8": fp16 * 2},
    "memory_bandwidth": bandwidth,
  }
  layer_times = {}
  for model_id, p in ((MODEL_ID, 0.4), ("other", 0.2)):
    if draw(st.floats(0, 1)) < p:
      layer_times[model_id] = {"decode_ms": draw(num(1e-3, 50)), "token_ms": draw(st.just(0.0) | num(1e-4, 5))}
  if layer_times:
    node["layer_times"] = layer_times
  return node


def _edges(draw, num, ids: list[str], ties: bool) -> list[dict]:
  """Directed edges, each pair with one probability per case, some with RTT and bandwidth, in a drawn order."""
  density = draw(st.sampled_from([0.3, 0.6, 1.0]))
  edges = []
  for u in ids:
    for v in ids:
      if u != v and draw(st.floats(0, 1)) < density:
        edge = {"from": u, "to": v}
        r = draw(st.none() | (st.sampled_from([1.0, 4.0]) if ties else st.floats(0, 30)))
        if r is not None:
          edge["rtt_ms"] = r
        w = draw(st.none() | st.just(0.0) | num(1, 1000))
        if w is not None:
          edge["bandwidth_mbps"] = w
        edges.append(edge)
  return draw(st.permutations(edges))


@st.composite
def cases(draw, min_nodes: int = 1, max_nodes: int = 6, max_layers: int = 8) -> dict:
  """{"topology", "model", "params"} with at least one node of known speed; caps range over 0..n_layers, so nothing may fit.

  Half the cases draw speeds, RTTs and bandwidths from two values each, so that many plans tie and the tie-breaks are exercised.
  v2 figures: measured layer_times on some nodes (for the served model, sometimes for another one that must be ignored),
  batch 1..8, embedding and head bytes of a few layers' size, tied or not.
  """
  ties = draw(st.booleans())
  num = (lambda lo, hi: st.sampled_from([lo, hi])) if ties else log_floats
  model = _model(draw, max_layers)
  params = _params(draw)
  n_nodes = draw(st.integers(min_nodes, max_nodes))
  ids = draw(st.lists(st.text("abcxyz", min_size=1, max_size=3), min_size=n_nodes, max_size=n_nodes, unique=True))
  nodes = {node_id: _node(draw, num, model, params, n_nodes) for node_id in ids}

  def known(n: dict) -> bool:
    return bool(n["flops"]["fp16"] or n["memory_bandwidth"] or MODEL_ID in n.get("layer_times", {}))

  if not any(known(n) for n in nodes.values()):
    nodes[ids[0]]["memory_bandwidth"] = draw(num(20, 1000))
  case = {"topology": {"nodes": nodes, "edges": _edges(draw, num, ids, ties)}, "model": model, "params": params}

  # keep every capacity's floor away from float rounding: any role, any ring length, either objective
  cm = cost_model(case)
  for node_id in ids:
    for k in range(1, n_nodes + 1):
      for first, last in [(True, True)] if k == 1 else [(True, False), (False, True), (False, False)]:
        for objective in OBJECTIVES:
          assume(clear_of_integers(cm.cap_quotient(node_id, first, last, k, objective)))
  return case


def check_feasible(case: dict, objective: str, plan: dict) -> None:
  """The plan's shards fit their nodes' capacities in their roles under `objective` at the plan's context, on distinct nodes,
  with ring neighbours adjacent."""
  cm = OracleCostModel(case["topology"], case["model"], **oracle_params(case), context_tokens=plan["context_tokens"])
  ids = [s["node_id"] for s in plan["shards"]]
  assert ids, "a plan must hold at least one shard"
  assert len(set(ids)) == len(ids), f"a node appears twice in the ring {ids}"
  for s, cap in zip(plan["shards"], cm.ring_caps(ids, objective), strict=True):
    count = s["end_layer"] - s["start_layer"] + 1
    assert 1 <= count <= cap, f"{s['node_id']} holds {count} layers, cap {cap} in its place in the ring {ids} under {objective}"
  if len(ids) >= 2:
    for u, v in zip(ids, ids[1:] + ids[:1], strict=True):
      assert cm.adjacent(u, v), f"ring neighbours {u} -> {v} share no edge"
  assert plan["predicted"]["feasible"] is True
