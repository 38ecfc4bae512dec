"""make_plan on small clusters whose optimal plans are worked out by hand from docs/DESIGN.md section 2 (cost model v2): which
nodes, which layers, and the predicted TPOT, throughput and TTFT; impossible requests raise ExoError."""

import pytest

from exo.base.errors import ExoError
from exo.tools.oracle_cost_model import OBJECTIVES
from exo.topology.planner import make_plan

GB = 1e9


def node(memory_mb: float, bandwidth_gbs: float = 0.0, fp16: float = 0.0) -> dict:
  return {"model": "dev", "chip": "chip", "memory": memory_mb, "flops": {"fp32": 0.0, "fp16": fp16, "int8": 0.0}, "memory_bandwidth": bandwidth_gbs}


def spec(n_layers: int, layer_bytes: float = GB, layer_flops: float = 1e9, activation_bytes: float = 1e4) -> dict:
  return {
    "id": "hand",
    "n_layers": n_layers,
    "layer_bytes": layer_bytes,
    "layer_flops": layer_flops,
    "activation_bytes": activation_bytes,
    "kv_bytes_per_layer": 0,
  }


def layers(plan: dict) -> list[tuple[str, int]]:
  return [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]


# With B = 1 GB and h = 0.1, cap = floor(M * 2**20 * 0.9 / 1e9): 1500 MB -> 1.42 -> 1, 2500 -> 2.36 -> 2, 5000 -> 4.72 -> 4,
# 10000 -> 9.44 -> 9. Per-layer time is B / b: 1000 GB/s -> 1 ms, 500 -> 2 ms, 333.33.. -> 3 ms, 100 -> 10 ms; F = 1e9 over
# 10 TFLOPS is 0.1 ms and never the bound.


def test_hand_fast_node_alone_for_latency_both_for_throughput():
  # f: 1 ms/layer, s: 2 ms/layer, both cap 9, 4 layers, rtt 2 ms (hop 1 ms each way), bandwidth unknown (no transfer term).
  # latency: f alone = 4 * 1 = 4 ms (any 2-ring pays >= 2 ms of hops on top of >= 4 ms of layers) -> 250 tok/s.
  # throughput: f alone bottleneck 4 ms; f3+s1 bottleneck max(3, 2) = 3 ms -> 333.3 tok/s, TPOT 3 + 2 + 2 = 7 ms;
  #   f2+s2 max(2, 4) = 4 ms. So throughput uses both nodes, 3 layers on f.
  topology = {"nodes": {"f": node(10000, 1000, 10), "s": node(10000, 500, 10)}, "edges": [{"from": "f", "to": "s", "rtt_ms": 2.0}]}
  lat = make_plan(topology, spec(4), objective="latency")
  assert layers(lat) == [("f", 4)]
  assert lat["predicted"]["tpot_ms"] == pytest.approx(4.0)
  assert lat["predicted"]["tokens_per_second"] == pytest.approx(250.0)
  assert lat["predicted"]["throughput_tps"] == pytest.approx(250.0)
  thr = make_plan(topology, spec(4), objective="throughput")
  assert sorted(layers(thr)) == [("f", 3), ("s", 1)]
  assert thr["predicted"]["throughput_tps"] == pytest.approx(1000 / 3)
  assert thr["predicted"]["tpot_ms"] == pytest.approx(7.0)


def test_hand_slow_link_makes_latency_drop_a_node():
  # a, b: 1 ms/layer, cap 2; c: 3 ms/layer, cap 4; 4 layers. Link a-b is slow (rtt 40 ms, hop 20 ms), a-c and b-c rtt 2 ms.
  # latency: c alone 12 ms; a2+b2 = 4 + 40 = 44 ms; a2+c2 = 2 + 6 + 2 = 10 ms (a1+c3 = 12); b2+c2 = 10 ms; any 3-ring
  #   uses the a-b link: >= 2 + 1 + 3 + 20 + 1 + 1 = 28 ms. Best 10 ms, dropping a or b; throughput there max(2, 6) -> 166.7.
  # throughput: a2+b2 bottleneck 2 ms -> 500 tok/s (TPOT 44 ms); 3-rings bottleneck >= 3 ms; a2+c2 6 ms.
  topology = {
    "nodes": {"a": node(2500, 1000, 10), "b": node(2500, 1000, 10), "c": node(5000, 1000 / 3, 10)},
    "edges": [{"from": "a", "to": "b", "rtt_ms": 40.0}, {"from": "a", "to": "c", "rtt_ms": 2.0}, {"from": "c", "to": "b", "rtt_ms": 2.0}],
  }
  lat = make_plan(topology, spec(4), objective="latency")
  assert len(lat["shards"]) == 2 and ("c", 2) in layers(lat)
  assert lat["predicted"]["tpot_ms"] == pytest.approx(10.0)
  assert lat["predicted"]["throughput_tps"] == pytest.approx(1000 / 6)
  thr = make_plan(topology, spec(4), objective="throughput")
  assert sorted(layers(thr)) == [("a", 2), ("b", 2)]
  assert thr["predicted"]["throughput_tps"] == pytest.approx(500.0)
  assert thr["predicted"]["tpot_ms"] == pytest.approx(44.0)


def test_hand_unknown_speed_and_averaged_edges():
  # x: 10 ms/layer (100 GB/s); y: speed unknown -> slowest known t = 10 ms, and the plan warns. Both cap 1, 2 layers: the
  # only plan is a 2-ring. Edges x->y (rtt 2, 6 Mbit/s) and y->x (rtt 6, 10 Mbit/s): rtt 4 -> 2 ms, bandwidth 8 Mbit/s ->
  # 1e4 B * 8 / 8e6 = 10 ms transfer; hop 12 ms each way. TPOT = 10 + 10 + 24 = 44 ms; bottleneck 10 + 10 = 20 ms -> 50/s.
  topology = {
    "nodes": {"x": node(1500, 100), "y": node(1500)},
    "edges": [{"from": "x", "to": "y", "rtt_ms": 2.0, "bandwidth_mbps": 6.0}, {"from": "y", "to": "x", "rtt_ms": 6.0, "bandwidth_mbps": 10.0}],
  }
  for objective in OBJECTIVES:
    plan = make_plan(topology, spec(2), objective=objective)
    assert sorted(layers(plan)) == [("x", 1), ("y", 1)]
    assert plan["predicted"]["tpot_ms"] == pytest.approx(44.0)
    assert plan["predicted"]["throughput_tps"] == pytest.approx(50.0)
    assert plan["warnings"]


def test_hand_default_rtt_applies_when_no_edge_measures_one():
  # Same x, y at 10 ms/layer each (y known this time), edge without rtt or bandwidth: rtt = default_rtt_ms = 8 -> hop 4 ms.
  # TPOT = 10 + 10 + 8 = 28 ms; bottleneck 10 ms -> 100/s.
  topology = {"nodes": {"x": node(1500, 100), "y": node(1500, 100)}, "edges": [{"from": "y", "to": "x"}]}
  plan = make_plan(topology, spec(2), objective="latency", default_rtt_ms=8.0)
  assert plan["predicted"]["tpot_ms"] == pytest.approx(28.0)
  assert plan["predicted"]["throughput_tps"] == pytest.approx(100.0)
  assert plan["params"]["default_rtt_ms"] == 8.0


def test_hand_impossible_requests_raise_plan_error():
  # 5 layers but caps 2 + 2 = 4: nothing fits.
  topology = {"nodes": {"a": node(2500, 1000), "b": node(2500, 1000)}, "edges": [{"from": "a", "to": "b", "rtt_ms": 1.0}]}
  with pytest.raises(ExoError):
    make_plan(topology, spec(5))
  # 4 layers fit in a + b together, but with no edge they cannot form a ring, and neither holds 4 alone.
  with pytest.raises(ExoError):
    make_plan({"nodes": topology["nodes"], "edges": []}, spec(4))
  # headroom 0.5 halves the caps: 2500 MB -> floor(1.31) = 1 each, so 3 layers no longer fit.
  with pytest.raises(ExoError):
    make_plan(topology, spec(3), memory_headroom=0.5)
  assert sorted(count for _, count in layers(make_plan(topology, spec(3)))) == [1, 2]


# ---------- hand-computed v2 cases (tests/topology/test_oracle_v2.py works the same numbers through the oracle) ----------


def test_hand_v2_head_and_measured_node_choose_the_first_stage():
  # p: roofline 1 ms/layer (c = 0.1 ms); q: measured decode 2 ms, token 0.5 ms (its roofline, 1 ms, ignored); p's layer_times
  # are for another model. E = 0.5 GB, H = 1 GB (eta = 1). Caps p: first 4, last 3, alone 3; q: first 1, last 1, alone 0.
  # Hop 2 + n * 1 ms. Only p3 q1 (TPOT 3 + 2 + 2 + 6 = 13 ms) and q1 p3 (TPOT 2 + 3 + 1 + 6 = 12 ms) fit, both 200/s (busiest
  # stage 5 ms). Both objectives pick q first: TPOT 12 ms, TTFT(128) = 64 + 3 * 12.8 + 12.8 + 2 * 130 = 375.2 ms.
  topology = {
    "nodes": {
      "p": {**node(5000, 1000, 10), "layer_times": {"other": {"decode_ms": 100.0, "token_ms": 100.0}}},
      "q": {**node(2500, 1000, 10), "layer_times": {"hand": {"decode_ms": 2.0, "token_ms": 0.5}}},
    },
    "edges": [{"from": "p", "to": "q", "rtt_ms": 4.0, "bandwidth_mbps": 80.0}],
  }
  model = {**spec(4), "embed_bytes": 0.5 * GB, "head_bytes": GB}
  for objective in OBJECTIVES:
    plan = make_plan(topology, model, objective=objective)
    assert layers(plan) == [("q", 1), ("p", 3)]
    assert plan["predicted"]["tpot_ms"] == pytest.approx(12.0)
    assert plan["predicted"]["throughput_tps"] == pytest.approx(200.0)
    assert plan["predicted"]["ttft_ms"] == pytest.approx(375.2)


def test_hand_v2_throughput_reserves_kv_for_every_request_in_flight():
  # F = 1e10, K = 0.25 GB, batch 4. a: t(1) = 1 ms, t(4) = 4 ms; b: t(1) = 2 ms, t(4) = 2 ms; hop 1 ms (default RTT 2 ms).
  # Caps a 7 (latency) / 4 alone / 3 in a 2-ring (8 requests); b 5 / 3 / 2. Latency: a alone, 4 ms, 4 / 16 ms = 250/s.
  # Throughput: a2 + b2, busiest stage 2 * 4 = 8 ms -> 500/s, TPOT 2 + 4 + 2 = 8 ms (a1 + b3 would give 666.7/s, but b holds
  # only 2 layers with 8 requests' KV).
  topology = {"nodes": {"a": node(10000, 1000, 10), "b": node(7000, 500, 20)}, "edges": [{"from": "b", "to": "a"}]}
  model = {**spec(4, layer_flops=1e10), "kv_bytes_per_layer": 0.25 * GB}
  lat = make_plan(topology, model, objective="latency", default_rtt_ms=2.0, batch=4)
  assert layers(lat) == [("a", 4)]
  assert (lat["predicted"]["tpot_ms"], lat["predicted"]["throughput_tps"]) == (pytest.approx(4.0), pytest.approx(250.0))
  thr = make_plan(topology, model, objective="throughput", default_rtt_ms=2.0, batch=4)
  assert sorted(layers(thr)) == [("a", 2), ("b", 2)]
  assert (thr["predicted"]["tpot_ms"], thr["predicted"]["throughput_tps"]) == (pytest.approx(8.0), pytest.approx(500.0))
  assert thr["params"]["batch"] == 4
