"""The planner beyond ten nodes against the exact optima of exo/tools/exact_oracle.py, and the bounds a plan reports.

Latency is exact up to 16 usable nodes: the plan's TPOT is the oracle's least TPOT on random sparse clusters of 11 to 16 nodes.
Throughput is exact up to 10 nodes; beyond, the plan carries bound_throughput_tps, which must be a true bound (no plan exceeds
it: the oracle's optimum does not) and equals the plan's throughput only when the plan is optimal. On small clusters both
bounds are checked against exo/tools/plan_oracle.py's enumeration of every plan, with link bandwidths (order-dependent stages).
"""

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo.base.errors import ExoError
from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology
from exo.tools.exact_oracle import optimum
from exo.tools.oracle_cost_model import check_predicted, close
from exo.tools.plan_oracle import oracle
from exo.topology.flops_latency_partitioning_strategy import FlopsLatencyPartitioningStrategy
from exo.topology.planner import make_plan
from tests.topology.planner_cases import cases, check_feasible, log_floats, oracle_params

REL = 1e-9
MODEL_ID = "m"


@st.composite
def sparse_clusters(draw, min_nodes: int = 11, max_nodes: int = 16, bandwidth: bool | None = None) -> dict:
  """{"topology", "model", "params"}: uneven nodes holding 15% to 120% of the model each, links missing at random, RTTs from
  each end's access delay (LAN to slow Wi-Fi); link bandwidth on some clusters (`bandwidth`: always or never)."""
  n_layers = draw(st.integers(4, 48))
  B = draw(log_floats(1e8, 2e9, 6))
  model = {
    "id": MODEL_ID,
    "n_layers": n_layers,
    "layer_bytes": B,
    "layer_flops": draw(log_floats(1e8, 1e11, 6)),
    "activation_bytes": draw(log_floats(1e3, 1e6, 6)),
    "kv_bytes_per_layer": draw(st.sampled_from([0.0, 0.01 * B, 0.1 * B])),
    "embed_bytes": draw(st.sampled_from([0.0, 0.3 * B, 2.5 * B])),
    "head_bytes": draw(st.sampled_from([0.0, 0.5 * B, 3.0 * B])),
    "tied_embeddings": draw(st.booleans()),
  }
  params = {"batch": draw(st.integers(1, 4))}
  total_mb = (n_layers * B + model["embed_bytes"] + model["head_bytes"]) / 2**20
  n = draw(st.integers(min_nodes, max_nodes))
  ids = [f"n{i:02d}" for i in range(n)]
  nodes, delay = {}, {}
  for node_id in ids:
    fp16 = draw(log_floats(1, 300, 6))
    nodes[node_id] = {
      "model": "dev",
      "chip": "chip",
      "memory": total_mb * draw(st.floats(0.15, 1.2)),
      "flops": {"fp32": fp16 / 2, "fp16": fp16, "int8": fp16 * 2},
      "memory_bandwidth": draw(log_floats(50, 3000, 6)),
    }
    if draw(st.integers(0, 4)) == 0:
      nodes[node_id]["layer_times"] = {MODEL_ID: {"decode_ms": draw(log_floats(0.05, 20, 6)), "token_ms": draw(log_floats(0.001, 2, 6))}}
    delay[node_id] = draw(st.sampled_from([(0.1, 0.6), (1.5, 6.0), (8.0, 30.0)]).flatmap(lambda r: st.floats(*r)))
  with_bandwidth = draw(st.booleans()) if bandwidth is None else bandwidth
  density = draw(st.floats(0.35, 1.0))
  edges = []
  for a in range(n):
    for b in range(a + 1, n):
      if draw(st.floats(0, 1)) < density:
        edge = {"from": ids[a], "to": ids[b], "rtt_ms": (delay[ids[a]] + delay[ids[b]]) * draw(st.floats(0.9, 1.2))}
        if with_bandwidth:
          edge["bandwidth_mbps"] = draw(st.sampled_from([100.0, 1000.0, 10000.0]))
        edges.append(edge)
  return {"topology": {"nodes": nodes, "edges": edges}, "model": model, "params": params}


def plan_or_none(case: dict, objective: str) -> dict | None:
  try:
    return make_plan(copy.deepcopy(case["topology"]), copy.deepcopy(case["model"]), objective=objective, **case["params"])
  except ExoError:
    return None


def best_of(case: dict, objective: str) -> float | None:
  return optimum(case["topology"], case["model"], objective, **oracle_params(case))


LARGE = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@LARGE
@given(case=sparse_clusters())
def test_latency_is_exact_up_to_sixteen_nodes(case):
  plan, best = plan_or_none(case, "latency"), best_of(case, "latency")
  assert (plan is None) == (best is None), f"plan {plan and plan['predicted']}, exact optimum {best}"
  if plan is None:
    return
  p = plan["predicted"]
  assert close(p["tpot_ms"] / 1000, best, REL), f"TPOT {p['tpot_ms']} ms, exact optimum {best * 1000} ms"
  assert p["bound_tpot_ms"] == p["tpot_ms"], "an exact plan's bound is its own TPOT"
  check_feasible(case, "latency", plan)
  check_predicted(case["topology"], case["model"], plan, objective="latency", **oracle_params(case))


@LARGE
@given(case=sparse_clusters(bandwidth=False))
def test_throughput_beyond_ten_nodes_reports_a_true_bound(case):
  plan, best = plan_or_none(case, "throughput"), best_of(case, "throughput")
  assert (plan is None) == (best is None), f"plan {plan and plan['predicted']}, exact optimum {best}"
  if plan is None:
    return
  p = plan["predicted"]
  assert p["throughput_tps"] <= best * (1 + REL), "no plan beats the optimum"
  assert p["bound_throughput_tps"] >= best * (1 - REL), f"bound {p['bound_throughput_tps']} below the optimum {best}"
  if p["bound_throughput_tps"] <= p["throughput_tps"] * (1 + REL):  # claimed optimal
    assert close(p["throughput_tps"], best, 1e-6)
  else:
    assert any("not proven optimal" in w for w in plan["warnings"])
  check_feasible(case, "throughput", plan)
  check_predicted(case["topology"], case["model"], plan, objective="throughput", **oracle_params(case))


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=sparse_clusters(min_nodes=14))
def test_latency_is_exact_on_many_large_clusters(case):
  test_latency_is_exact_up_to_sixteen_nodes.hypothesis.inner_test(case)


def heuristic_plan(case: dict, objective: str):
  """The plan with the exact searches switched off, so that its prediction carries a computed bound."""
  model = ModelSpec.from_dict(case["model"])
  strategy = FlopsLatencyPartitioningStrategy(model, objective, method="heuristic", **case["params"])
  try:
    return strategy.plan(Topology.from_dict(copy.deepcopy(case["topology"])))
  except ExoError:
    return None


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=cases(max_nodes=5))
def test_computed_bounds_hold_against_every_plan(case, objective):
  plan = heuristic_plan(case, objective)
  best = oracle(case["topology"], case["model"], **oracle_params(case))
  if plan is None or best is None:
    return
  p = plan.prediction
  if objective == "latency":
    assert p.bound_tpot_s <= best["best_tpot"] * (1 + REL), f"bound {p.bound_tpot_s}, optimum {best['best_tpot']}"
    assert p.tpot_s >= best["best_tpot"] * (1 - REL)
  else:
    assert p.bound_throughput_tps >= best["best_throughput"] * (1 - REL), f"bound {p.bound_throughput_tps}, optimum {best['best_throughput']}"
    assert p.throughput_tps <= best["best_throughput"] * (1 + REL)


def test_beyond_sixteen_nodes_the_best_pair_is_found_and_the_plan_states_its_bound():
  # 24 nodes of 1 ms/layer (1 GB layers, 1000 GB/s), 3 layers each, 1 ms links. The model (6 layers) needs two of them. Nodes
  # p and q, which the speed ranking does not favour (ids sort last, same speed), share a 0.02 ms link: p3 + q3 = 6 ms + 0.02 ms
  # of hops is the optimum; any other ring pays at least 2 ms of hops.
  gb = 1e9
  nodes = {f"n{i:02d}": {"memory": 3.5 * gb / 2**20 / 0.9, "memory_bandwidth": 1000.0} for i in range(22)}
  nodes |= {"zp": dict(nodes["n00"]), "zq": dict(nodes["n00"])}
  ids = sorted(nodes)
  edges = [{"from": a, "to": b, "rtt_ms": 0.02 if {a, b} == {"zp", "zq"} else 2.0} for i, a in enumerate(ids) for b in ids[i + 1 :]]
  model = {"id": "m", "n_layers": 6, "layer_bytes": gb, "layer_flops": 1e9, "activation_bytes": 1e4}
  plan = make_plan({"nodes": nodes, "edges": edges}, model)
  assert sorted(s["node_id"] for s in plan["shards"]) == ["zp", "zq"]
  p = plan["predicted"]
  assert p["tpot_ms"] == pytest.approx(6.02)
  assert p["bound_tpot_ms"] <= p["tpot_ms"] and p["bound_throughput_tps"] is None
  if p["bound_tpot_ms"] < p["tpot_ms"] * (1 - 1e-9):
    assert any("not proven optimal" in w for w in plan["warnings"])


def test_a_star_whose_speed_ranked_prefixes_never_hold_the_model_still_gets_the_two_node_plan():
  """Found by the test above: 11 nodes linked only through a hub. Under throughput every node keeps KV cache for each stage's
  requests, so a longer prefix of the speed ranking holds fewer layers per node, and no prefix holds the 8 layers; the hub with
  one large leaf does (4 + 4 layers in a ring of two)."""
  sizes = [800e6, 400e6, 400e6, 400e6, 200e6] + [800e6] * 6  # bytes; the small leaves rank first on speed ties
  node = {"model": "dev", "chip": "chip", "flops": {"fp32": 0.5, "fp16": 1.0, "int8": 2.0}, "memory_bandwidth": 100.0}
  times = {"m": {"decode_ms": 1.0, "token_ms": 1.0}}
  nodes = {f"n{i:02d}": {**node, "memory": size / 2**20, "layer_times": times} for i, size in enumerate(sizes)}
  edges = [{"from": "n00", "to": f"n{i:02d}", "rtt_ms": 1.0} for i in range(1, len(sizes))]
  model = {"id": "m", "n_layers": 8, "layer_bytes": 1e8, "layer_flops": 1e9, "activation_bytes": 1e3, "kv_bytes_per_layer": 1e7}
  case = {"topology": {"nodes": nodes, "edges": edges}, "model": {**model, "embed_bytes": 0.0, "head_bytes": 0.0}, "params": {"batch": 4}}
  plan = plan_or_none(case, "throughput")
  assert plan is not None, "a plan exists: the hub and one 800 MB leaf"
  assert [s["end_layer"] - s["start_layer"] + 1 for s in plan["shards"]] == [4, 4] and "n00" in [s["node_id"] for s in plan["shards"]]
  assert close(plan["predicted"]["throughput_tps"], best_of(case, "throughput"), REL)
