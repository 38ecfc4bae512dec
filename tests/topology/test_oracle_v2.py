"""Hand-calculated checks of the v2 oracle itself (exo/tools/plan_oracle.py), so a wrong oracle cannot pass the property tests.

Units below: memory in MB (2**20 bytes), times in ms unless said. With headroom h = 0.1 the usable bytes M * 2**20 * 0.9 are
1500 MB -> 1.4155776e9, 2500 -> 2.359296e9, 5000 -> 4.718592e9, 7000 -> 6.6060288e9, 10000 -> 9.437184e9.
"""

import copy

import pytest

from exo.tools.oracle_cost_model import OracleCostModel, check_predicted, evaluate_plan
from exo.tools.plan_oracle import BruteForce, compositions, oracle

GB = 1e9


def node(memory_mb: float, bandwidth_gbs: float = 0.0, fp16: float = 0.0, layer_times: dict | None = None) -> dict:
  out = {"model": "dev", "chip": "chip", "memory": memory_mb, "flops": {"fp32": 0.0, "fp16": fp16, "int8": 0.0}, "memory_bandwidth": bandwidth_gbs}
  if layer_times is not None:
    out["layer_times"] = layer_times
  return out


def spec(n_layers: int, layer_flops: float = 1e9, kv: float = 0.0, embed: float = 0.0, head: float = 0.0, tied: bool = False) -> dict:
  return {
    "id": "m",
    "n_layers": n_layers,
    "layer_bytes": GB,
    "layer_flops": layer_flops,
    "activation_bytes": 1e4,
    "kv_bytes_per_layer": kv,
    "embed_bytes": embed,
    "head_bytes": head,
    "tied_embeddings": tied,
  }


def plan_json(ring: list[tuple[str, int]], n_layers: int, objective: str, predicted: dict) -> dict:
  shards, start = [], 0
  for node_id, count in ring:
    shards.append({"node_id": node_id, "start_layer": start, "end_layer": start + count - 1, "n_layers": n_layers})
    start += count
  return {"objective": objective, "shards": shards, "predicted": predicted}


def test_compositions_respect_caps():
  assert list(compositions(4, [3, 2])) == [(2, 2), (3, 1)]
  assert list(compositions(3, [5])) == [(3,)]
  assert list(compositions(3, [2])) == []
  assert list(compositions(2, [1, 1, 1])) == []


# ---------- two nodes, one measured, embedding and head ----------

# p: roofline d = max(F / f, B / b) = max(1e9 / 10e12, 1e9 / 1000e9) = max(0.1, 1) = 1 ms, c = F / f = 0.1 ms; its layer_times
#    are for another model and are ignored. t_p(1) = 1, t_p(128) = max(1, 12.8) = 12.8.
# q: layer_times for "m": d = 2, c = 0.5 (its roofline, 1 ms, is ignored). t_q(1) = 2, t_q(128) = max(2, 64) = 64.
# E = 0.5 GB (first stage), H = 1 GB (last stage), eta = H / B = 1. K = 0.
# caps, B = 1 GB: p: interior 4.72 -> 4, first 4.22 -> 4, last 3.72 -> 3, alone 3.22 -> 3;
#                 q: interior 2.36 -> 2, first 1.86 -> 1, last 1.36 -> 1, alone 0.86 -> 0.
# edge p -> q: rtt 4 ms, 80 Mbit/s: hop(n) = 2 + n * 1e4 * 8 / 80e6 s = 2 + n ms; hop(1) = 3, hop(128) = 130.
# 4 layers. Neither node alone fits (3 < 4, 0 < 4); p first: caps (4, 1) -> only p3 q1; q first: caps (1, 3) -> only q1 p3.
# [(p, 3), (q, 1)]: TPOT = 3*1 + 1*2 + eta*2 + 2*3 = 13; stages p 3*1 + 1 (send) = 4, q 2 + 2 (head) + 1 = 5 -> 200/s;
#   TTFT = 3*12.8 + 64 + 64 + 2*130 = 426.4.
# [(q, 1), (p, 3)]: TPOT = 2 + 3*1 + eta*1 + 2*3 = 12; stages q 2 + 1 = 3, p 3 + 1 (head) + 1 = 5 -> 200/s;
#   TTFT = 64 + 3*12.8 + 12.8 + 260 = 375.2.
# Best TPOT 12 ms (q first), throughput 200 in both, so the throughput tie goes to the lower TPOT, 12 ms.

TWO = {
  "nodes": {
    "p": node(5000, 1000, 10, layer_times={"other": {"decode_ms": 100.0, "token_ms": 100.0}}),
    "q": node(2500, 1000, 10, layer_times={"m": {"decode_ms": 2.0, "token_ms": 0.5}}),
  },
  "edges": [{"from": "p", "to": "q", "rtt_ms": 4.0, "bandwidth_mbps": 80.0}],
}
TWO_MODEL = spec(4, embed=0.5 * GB, head=GB)


def test_layer_times_embedding_and_head_on_two_nodes():
  cm = OracleCostModel(TWO, TWO_MODEL)
  assert cm.t("p", 1) == pytest.approx(1e-3) and cm.t("p", 128) == pytest.approx(12.8e-3)
  assert cm.t("q", 1) == pytest.approx(2e-3) and cm.t("q", 128) == pytest.approx(64e-3)
  assert cm.eta == 1.0
  assert [cm.cap("p", f, la, k, "latency") for f, la, k in [(False, False, 2), (True, False, 2), (False, True, 2), (True, True, 1)]] == [4, 4, 3, 3]
  assert [cm.cap("q", f, la, k, "latency") for f, la, k in [(False, False, 2), (True, False, 2), (False, True, 2), (True, True, 1)]] == [2, 1, 1, 0]
  assert cm.hop("p", "q", 1) == pytest.approx(3e-3) and cm.hop("q", "p", 128) == pytest.approx(130e-3)

  tpot, thr = cm.evaluate([("p", 3), ("q", 1)])
  assert (tpot, thr) == (pytest.approx(13e-3), pytest.approx(200.0))
  assert cm.ttft([("p", 3), ("q", 1)]) == pytest.approx(426.4e-3)
  tpot, thr = cm.evaluate([("q", 1), ("p", 3)])
  assert (tpot, thr) == (pytest.approx(12e-3), pytest.approx(200.0))
  assert cm.ttft([("q", 1), ("p", 3)]) == pytest.approx(375.2e-3)

  for objective in ("latency", "throughput"):
    assert sorted(map(tuple, BruteForce(TWO, TWO_MODEL, objective).plans())) == [(("p", 3), ("q", 1)), (("q", 1), ("p", 3))]
  best = oracle(TWO, TWO_MODEL)
  assert best == {
    "best_tpot": pytest.approx(12e-3),
    "throughput_at_best_tpot": pytest.approx(200.0),
    "best_throughput": pytest.approx(200.0),
    "tpot_at_best_throughput": pytest.approx(12e-3),
    "throughput_at_best_tpot_band": pytest.approx((200.0, 200.0)),
    "tpot_at_best_throughput_band": pytest.approx((12e-3, 12e-3)),
    "n_plans": 2,
    "n_throughput_plans": 2,
    "context_latency": 8192,
    "context_throughput": 8192,
  }


def test_check_predicted_accepts_the_right_numbers_and_rejects_wrong_ones():
  predicted = {"tpot_ms": 12.0, "tokens_per_second": 1000 / 12, "throughput_tps": 200.0, "ttft_ms": 375.2, "feasible": True}
  plan = plan_json([("q", 1), ("p", 3)], 4, "latency", predicted)
  assert evaluate_plan(TWO, TWO_MODEL, plan) == {
    "tpot_s": pytest.approx(12e-3),
    "throughput_tps": pytest.approx(200.0),
    "ttft_s": pytest.approx(375.2e-3),
    "feasible": True,
  }
  check_predicted(TWO, TWO_MODEL, plan)
  for key, wrong in [("tpot_ms", 13.0), ("tokens_per_second", 80.0), ("throughput_tps", 250.0), ("ttft_ms", 426.4), ("feasible", False)]:
    bad = copy.deepcopy(plan)
    bad["predicted"][key] = wrong
    with pytest.raises(AssertionError, match=key):
      check_predicted(TWO, TWO_MODEL, bad)
  # q holding 2 layers as the first stage exceeds its cap of 1: evaluated as infeasible
  over = plan_json([("q", 2), ("p", 2)], 4, "latency", {})
  assert evaluate_plan(TWO, TWO_MODEL, over)["feasible"] is False


# ---------- tied embeddings on a node that is both first and last ----------

# s: bandwidth 500 GB/s, TFLOPS unknown: d = B / b = 2 ms, c = 0 (no compute term), so t_s(n) = 2 ms for every n.
# E = 1 GB, H = 1.2 GB, eta = 1.2. Alone and tied: reserve max(E, H) = 1.2 GB once: (4.718592 - 1.2) = 3.52 -> cap 3.
# Untied: reserve E + H = 2.2 GB: 2.52 -> cap 2. As one stage of a longer ring: first 3.72 -> 3, last 3.52 -> 3, interior 4.
# 3 layers alone: TPOT = 3*2 + 1.2*2 = 8.4 ms -> 119.05/s; TTFT(128) is the same 8.4 ms (t(128) = 2 ms, no hops);
# throughput at batch 4 = 4 / ((3 + 1.2) * t(4) = 8.4 ms) = 476.19/s.


def test_tied_embeddings_held_once_by_a_single_node():
  topology = {"nodes": {"s": node(5000, 500)}, "edges": []}
  tied, untied = spec(3, embed=GB, head=1.2 * GB, tied=True), spec(3, embed=GB, head=1.2 * GB, tied=False)
  cm = OracleCostModel(topology, tied)
  assert cm.cap("s", True, True, 1, "latency") == 3
  assert OracleCostModel(topology, untied).cap("s", True, True, 1, "latency") == 2
  assert [cm.cap("s", f, la, 2, "latency") for f, la in [(True, False), (False, True), (False, False)]] == [3, 3, 4]
  assert cm.evaluate([("s", 3)]) == (pytest.approx(8.4e-3), pytest.approx(1000 / 8.4))
  assert cm.ttft([("s", 3)]) == pytest.approx(8.4e-3)
  assert OracleCostModel(topology, tied, batch=4).throughput([("s", 3)]) == pytest.approx(4000 / 8.4)
  best = oracle(topology, tied, batch=4)
  assert best["best_tpot"] == pytest.approx(8.4e-3) and best["best_throughput"] == pytest.approx(4000 / 8.4)
  assert (best["n_plans"], best["n_throughput_plans"]) == (1, 1)
  assert oracle(topology, untied) is None


# ---------- batch 4 with KV cache: throughput reserves k * b requests ----------

# F = 1e10 FLOPs per layer, K = 0.25 GB per request per layer, E = H = 0, 4 layers, batch b = 4.
# a: 10 TFLOPS, 1000 GB/s: F / f = 1 ms, B / b = 1 ms: d = 1, c = 1: t_a(1) = 1, t_a(4) = 4.
# b: 20 TFLOPS, 500 GB/s: F / f = 0.5, B / b = 2: d = 2, c = 0.5: t_b(1) = 2, t_b(4) = max(2, 2) = 2.
# One edge b -> a without measurements: r = default_rtt_ms = 2 -> hop 1 ms, no transfer term.
# caps (usable / (B + c K)): a 9.437184e9: c = 1 -> /1.25e9 = 7.55 -> 7; c = 4 (k = 1) -> /2e9 = 4.72 -> 4; c = 8 (k = 2) -> /3e9 = 3.15 -> 3
#                            b 6.6060288e9: c = 1 -> 5.28 -> 5;               c = 4 -> 3.30 -> 3;            c = 8 -> 2.20 -> 2
# latency (c = 1): a alone 4 ms (the best; any 2-ring pays 2 ms of hops on >= 5 ms of layers), throughput 4 / (4 * 4 ms) = 250/s;
#   b alone 8 ms; 2-rings: 2 orders x splits (1,3), (2,2), (3,1) all within caps 7 and 5: 8 plans.
# throughput: a alone (cap 4) 250/s; b alone needs 4 > 3; 2-rings caps a 3, b 2: (a2, b2) stages 2*4 = 8, 2*2 = 4 -> 4 / 8 ms =
#   500/s, TPOT 2 + 4 + 2 = 8 ms; (a3, b1) 12 ms -> 333/s. 1 + 2 * 2 = 5 plans. With v1's single request (c = 1), (a1, b3) would
#   reach 4 / max(4, 6) ms = 666.7/s, but b cannot hold 3 layers with the KV of 8 requests.


def test_batch_with_kv_cache_shrinks_throughput_caps():
  topology = {"nodes": {"a": node(10000, 1000, 10), "b": node(7000, 500, 20)}, "edges": [{"from": "b", "to": "a"}]}
  model = spec(4, layer_flops=1e10, kv=0.25 * GB)
  cm = OracleCostModel(topology, model, default_rtt_ms=2.0, batch=4)
  assert (cm.t("a", 1), cm.t("a", 4), cm.t("b", 1), cm.t("b", 4)) == (
    pytest.approx(1e-3),
    pytest.approx(4e-3),
    pytest.approx(2e-3),
    pytest.approx(2e-3),
  )
  assert cm.hop("a", "b", 1) == pytest.approx(1e-3)
  assert [cm.cap("a", True, True, 1, o) for o in ("latency", "throughput")] == [7, 4]
  assert [cm.cap("b", True, True, 1, o) for o in ("latency", "throughput")] == [5, 3]
  assert [cm.cap(n, False, False, 2, "throughput") for n in "ab"] == [3, 2]
  assert cm.evaluate([("a", 2), ("b", 2)]) == (pytest.approx(8e-3), pytest.approx(500.0))
  assert cm.throughput([("a", 1), ("b", 3)]) == pytest.approx(4000 / 6)
  assert cm.feasible([("a", 1), ("b", 3)], "latency") and not cm.feasible([("a", 1), ("b", 3)], "throughput")
  best = oracle(topology, model, default_rtt_ms=2.0, batch=4)
  assert best == {
    "best_tpot": pytest.approx(4e-3),
    "throughput_at_best_tpot": pytest.approx(250.0),
    "best_throughput": pytest.approx(500.0),
    "tpot_at_best_throughput": pytest.approx(8e-3),
    "throughput_at_best_tpot_band": pytest.approx((250.0, 250.0)),
    "tpot_at_best_throughput_band": pytest.approx((8e-3, 8e-3)),
    "n_plans": 8,
    "n_throughput_plans": 5,
    "context_latency": 8192,
    "context_throughput": 8192,
  }


def test_throughput_plans_a_shorter_context_when_only_latency_fits_the_full_one():
  # a alone (usable 9.437184e9 bytes), 5 layers: latency cap 7 fits at 8192 tokens; throughput at batch 4 caps it at 4 (see
  # above), so v2.1 shortens the context C: 5 (1e9 + 4 * 0.25e9 * C / 8192) <= 9.437184e9 holds up to C = 7269, so 7168.
  topology = {"nodes": {"a": node(10000, 1000, 10)}, "edges": []}
  best = oracle(topology, spec(5, layer_flops=1e10, kv=0.25 * GB), batch=4)
  assert best["best_tpot"] == pytest.approx(5e-3) and best["n_plans"] == 1 and best["context_latency"] == 8192
  assert best["context_throughput"] == 7168 and best["best_throughput"] == pytest.approx(4 / 0.020)


def test_throughput_part_is_none_when_only_latency_fits():
  # 9 layers, K = 0.5 GB at 8192 tokens: latency (one request) fits 9 (1e9 + 0.5e9 C / 8192) <= 9.437184e9 up to C = 796, so 768;
  # throughput (4 requests) needs 1e9 + 4 * 0.5e9 * 512 / 8192 = 1.125e9 per layer even at 512 tokens: 8.4 layers, no plan.
  topology = {"nodes": {"a": node(10000, 1000, 10)}, "edges": []}
  best = oracle(topology, spec(9, layer_flops=1e10, kv=0.5 * GB), batch=4)
  assert best["best_tpot"] == pytest.approx(9e-3) and best["n_plans"] == 1 and best["context_latency"] == 768
  assert (best["best_throughput"], best["tpot_at_best_throughput"], best["n_throughput_plans"], best["context_throughput"]) == (None, None, 0, None)


# ---------- unknown speed: the slowest known t_j(n), for each n separately ----------

# x: 10 TFLOPS, bandwidth unknown: d = c = F / f = 0.1 ms: t_x(n) = 0.1 n ms.  y: measured d = 2, c = 0.01: t_y(n) = max(2, 0.01 n).
# z: no TFLOPS, no bandwidth, layer_times only for another model: unknown.
# t_z(1) = max(t_x(1) = 0.1, t_y(1) = 2) = 2 (from y); t_z(128) = max(12.8, 2) = 12.8 (from x); t_z(30) = max(3, 2) = 3 (from x).
# z alone with 2 layers: TPOT 4 ms -> 250/s; TTFT 2 * 12.8 = 25.6 ms; throughput at batch 30: 30 / (2 * 3 ms) = 5000/s.


def test_unknown_speed_takes_the_slowest_known_time_per_token_count():
  topology = {
    "nodes": {
      "x": node(5000, 0, 10),
      "y": node(5000, layer_times={"m": {"decode_ms": 2.0, "token_ms": 0.01}}),
      "z": node(5000, layer_times={"other": {"decode_ms": 1.0, "token_ms": 1.0}}),
    },
    "edges": [],
  }
  cm = OracleCostModel(topology, spec(2), batch=30)
  assert [cm.known_speed(n) for n in "xyz"] == [True, True, False]
  assert (cm.t("z", 1), cm.t("z", 128), cm.t("z", 30)) == (pytest.approx(2e-3), pytest.approx(12.8e-3), pytest.approx(3e-3))
  assert cm.evaluate([("z", 2)]) == (pytest.approx(4e-3), pytest.approx(5000.0))
  assert cm.ttft([("z", 2)]) == pytest.approx(25.6e-3)
  assert cm.ttft([("z", 2)], prompt_tokens=1) == pytest.approx(4e-3)


# ---------- v2 reduces to v1: no layer_times, batch 1, E = H = 0, K = 0 ----------


def test_v1_slow_link_case():
  # a, b: 1 ms/layer (1000 GB/s), cap 2 (2500 MB); c: 3 ms/layer, cap 4 (5000 MB); 4 layers. a-b rtt 40 (hop 20), a-c, c-b rtt 2.
  # v1: latency best a2+c2 (or b2+c2) = 2 + 6 + 2 = 10 ms, throughput there 1 / max(2, 6) ms = 166.7/s; throughput best a2+b2
  # = 1 / 2 ms = 500/s at TPOT 4 + 40 = 44 ms. v2 adds nothing here (eta = 0, c = 1 or k with K = 0, t(1) = d).
  topology = {
    "nodes": {"a": node(2500, 1000, 10), "b": node(2500, 1000, 10), "c": node(5000, 1000 / 3, 10)},
    "edges": [{"from": "a", "to": "b", "rtt_ms": 40.0}, {"from": "a", "to": "c", "rtt_ms": 2.0}, {"from": "c", "to": "b", "rtt_ms": 2.0}],
  }
  model = spec(4)
  for m in (model, {k: v for k, v in model.items() if k not in ("kv_bytes_per_layer", "embed_bytes", "head_bytes", "tied_embeddings")}):
    best = oracle(topology, m, batch=1)
    assert best["best_tpot"] == pytest.approx(0.010)
    assert best["throughput_at_best_tpot"] == pytest.approx(1000 / 6)
    assert best["best_throughput"] == pytest.approx(500.0)
    assert best["tpot_at_best_throughput"] == pytest.approx(0.044)
    assert best["n_plans"] == best["n_throughput_plans"]
  assert oracle(topology, spec(9)) is None  # caps 2 + 2 + 4 = 8 < 9
  # v1's TTFT at P tokens: per layer max(P F / f, B / b) = max(P * 0.1, 1) ms on a, b; so for P = 128 on a2 + c2:
  # a 2 * 12.8, c 2 * max(12.8, 3) = 2 * 12.8, hops 2 * 1 ms (no bandwidth): 53.2 ms.
  assert OracleCostModel(topology, model).ttft([("a", 2), ("c", 2)]) == pytest.approx(53.2e-3)


def test_v1_unknown_speed_and_averaged_edges():
  # x: 10 ms/layer (100 GB/s); y unknown -> 10 ms. Both cap 1 (1500 MB), 2 layers: only the 2-ring. Edges x->y (rtt 2, 6 Mbit/s),
  # y->x (rtt 6, 10 Mbit/s): rtt 4 -> 2 ms, bandwidth 8 Mbit/s -> 1e4 * 8 / 8e6 = 10 ms; hop 12 ms each way.
  # TPOT = 10 + 10 + 24 = 44 ms; bottleneck 10 + 10 = 20 ms -> 50/s. Two plans (x first or y first), same values.
  topology = {
    "nodes": {"x": node(1500, 100), "y": node(1500)},
    "edges": [{"from": "x", "to": "y", "rtt_ms": 2.0, "bandwidth_mbps": 6.0}, {"from": "y", "to": "x", "rtt_ms": 6.0, "bandwidth_mbps": 10.0}],
  }
  best = oracle(topology, spec(2))
  assert (best["best_tpot"], best["best_throughput"], best["n_plans"]) == (pytest.approx(0.044), pytest.approx(50.0), 2)
  assert (best["tpot_at_best_throughput"], best["throughput_at_best_tpot"]) == (pytest.approx(0.044), pytest.approx(50.0))
