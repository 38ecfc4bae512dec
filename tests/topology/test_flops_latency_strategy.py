import itertools
import random

import pytest

from exo.base.errors import BadInput, ExoError
from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology
from exo.topology.flops_latency_partitioning_strategy import FlopsLatencyPartitioningStrategy
from exo.topology.partitioning_strategy import Partition
from exo.topology.plan_request import PlanRequest
from exo.topology.planner import make_plan, plan_for

MODEL = {"id": "m", "n_layers": 10, "layer_bytes": 1e9, "layer_flops": 2e9, "activation_bytes": 8192}


def node(memory_gb, bandwidth, fp16=0):
  return {"memory": memory_gb * 1024, "flops": {"fp16": fp16}, "memory_bandwidth": bandwidth}


def mesh(nodes: dict, rtt_ms: float = 2.0) -> dict:
  return {"nodes": nodes, "edges": [{"from": a, "to": b, "rtt_ms": rtt_ms} for a, b in itertools.combinations(sorted(nodes), 2)]}


def layers(plan):
  return [(s["node_id"], s["end_layer"] - s["start_layer"] + 1) for s in plan["shards"]]


def test_latency_keeps_the_model_on_the_fast_node_that_holds_it():
  # fast: 10 ms/layer, slow: 20 ms/layer. Fast alone: 100 ms. Any split adds a slower layer and a 2 ms round trip.
  topology = mesh({"fast": node(16, 100), "slow": node(16, 50)})
  plan = make_plan(topology, MODEL)
  assert layers(plan) == [("fast", 10)]
  assert plan["predicted"]["tpot_ms"] == pytest.approx(100)


def test_throughput_uses_both_nodes_and_balances_stages():
  topology = mesh({"fast": node(16, 100), "slow": node(16, 50)})
  plan = make_plan(topology, MODEL, objective="throughput")
  # 7 x 10 ms vs 3 x 20 ms: busiest stage 70 ms (6/4 would be 80 ms)
  assert layers(plan) == [("fast", 7), ("slow", 3)]
  assert plan["predicted"]["throughput_tps"] == pytest.approx(1000 / 70)


def test_a_node_behind_a_slow_link_is_left_out_for_latency():
  nodes = {"a": node(6, 100), "b": node(6, 100), "far": node(6, 200)}
  topology = {
    "nodes": nodes,
    "edges": [{"from": "a", "to": "b", "rtt_ms": 1}, {"from": "a", "to": "far", "rtt_ms": 80}, {"from": "b", "to": "far", "rtt_ms": 80}],
  }
  plan = make_plan(topology, MODEL)
  assert sorted(n for n, _ in layers(plan)) == ["a", "b"]
  assert plan["predicted"]["tpot_ms"] == pytest.approx(100 + 1)  # 10 layers at 10 ms plus two half-RTT hops


def test_memory_cap_forces_a_split_onto_the_slower_node():
  topology = mesh({"fast": node(4, 100), "slow": node(16, 50)})  # fast holds floor(4 GiB * 0.9 / 1 GB) = 3 layers
  plan = make_plan(topology, MODEL)
  assert dict(layers(plan)) == {"fast": 3, "slow": 7}
  assert plan["predicted"]["tpot_ms"] == pytest.approx(3 * 10 + 7 * 20 + 2)


def test_more_nodes_than_layers_uses_at_most_one_node_per_layer():
  model = dict(MODEL, n_layers=3, layer_bytes=1e8)
  topology = mesh({f"n{i}": node(1, 100) for i in range(6)})
  plan = make_plan(topology, model, objective="throughput")
  assert len(plan["shards"]) == 3 and all(n == 1 for _, n in layers(plan))


def test_single_node():
  plan = make_plan({"nodes": {"solo": node(16, 100)}}, MODEL)
  assert layers(plan) == [("solo", 10)] and plan["partitions"] == [{"node_id": "solo", "start": 0.0, "end": 1.0}]


def test_model_too_large_is_refused():
  with pytest.raises(ExoError, match="does not fit.*holds only 6 layers"):
    make_plan(mesh({"a": node(4, 100), "b": node(4, 100)}), MODEL)


def test_nodes_that_fit_only_together_but_share_no_edge_are_refused():
  with pytest.raises(ExoError, match="no ring"):
    make_plan({"nodes": {"a": node(8, 100), "b": node(8, 100)}, "edges": []}, MODEL)


def test_no_known_speed_falls_back_to_memory_weighted_split():
  plan = make_plan(mesh({"big": node(16, 0), "small": node(8, 0)}), MODEL)
  assert dict(layers(plan)) == {"big": 7, "small": 3}  # capacities 14 and 7: shares 2:1 of 10 layers
  assert plan["predicted"]["tpot_ms"] is None and "memory-weighted" in plan["warnings"][0]


def test_partition_works_without_a_model_and_covers_zero_to_one():
  t = Topology.from_dict(mesh({"a": node(16, 100, 20), "b": node(16, 400, 40)}))
  partitions = FlopsLatencyPartitioningStrategy().partition(t)
  assert partitions[0].start == 0 and partitions[-1].end == 1
  assert all(isinstance(p, Partition) for p in partitions)
  assert FlopsLatencyPartitioningStrategy().plan(t).warnings == ["no model was given: planned for llama-3.2-1b, upstream's default model"]
  assert FlopsLatencyPartitioningStrategy(ModelSpec.from_dict(MODEL)).plan(t).warnings == []


def test_bad_parameters_are_refused():
  with pytest.raises(ExoError, match="objective must be one of latency, throughput"):
    make_plan(mesh({"a": node(16, 100)}), MODEL, objective="speed")
  with pytest.raises(ExoError, match="memory headroom must be a fraction"):
    make_plan(mesh({"a": node(16, 100)}), MODEL, memory_headroom=1.5)
  with pytest.raises(ExoError, match="unknown planner parameter 'hops'"):
    make_plan(mesh({"a": node(16, 100)}), MODEL, hops=3)
  with pytest.raises(ExoError, match="unknown partitioning strategy"):
    make_plan(mesh({"a": node(16, 100)}), MODEL, strategy="random")


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_the_search_method_is_checked_and_exact_refuses_a_cluster_beyond_its_limit(objective):
  # 17 nodes of 16 GiB on a full mesh: each holds the 10 layers of 1 GB, all 17 are usable, one more than the exact searches take
  model, topology = ModelSpec.from_dict(MODEL), Topology.from_dict(mesh({f"n{i:02d}": node(16, 100 + i) for i in range(17)}))
  with pytest.raises(BadInput, match="search method must be one of auto, exact, heuristic, got 'fast'"):
    FlopsLatencyPartitioningStrategy(model, objective, method="fast")
  with pytest.raises(BadInput, match=f"the exact {objective} search takes at most 16 usable nodes and this cluster has 17"):
    FlopsLatencyPartitioningStrategy(model, objective, method="exact").plan(topology)
  assert FlopsLatencyPartitioningStrategy(model, objective, method="heuristic").plan(topology).prediction.feasible


def random_cluster(n, seed):
  rng = random.Random(seed)
  nodes = {f"n{i:02d}": node(rng.choice([2, 4, 8]), rng.choice([50, 100, 200, 400]), rng.choice([0, 5, 20])) for i in range(n)}
  edges = [
    {"from": a, "to": b, "rtt_ms": rng.uniform(0.5, 10), **({"bandwidth_mbps": rng.choice([100, 1000])} if seed % 2 else {})}
    for a, b in itertools.combinations(sorted(nodes), 2)
    if rng.random() < 0.8
  ]
  return {"nodes": nodes, "edges": edges}


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("seed", range(6))
def test_heuristic_plans_are_valid_and_never_beat_the_exact_optimum(objective, seed):
  model = ModelSpec.from_dict(dict(MODEL, n_layers=24, layer_bytes=3e8))
  topology = Topology.from_dict(random_cluster(9, seed))
  exact = FlopsLatencyPartitioningStrategy(model, objective).plan(topology)
  heuristic = FlopsLatencyPartitioningStrategy(model, objective, method="heuristic").plan(topology)
  for plan in (exact, heuristic):
    ring = plan.ring()
    assert sum(n for _, n in ring) == 24 and plan.prediction.feasible
    assert all(topology.are_neighbours(a, b) for (a, _), (b, _) in zip(ring, ring[1:] + ring[:1]) if a != b)
  if objective == "latency":
    assert heuristic.prediction.tpot_s >= exact.prediction.tpot_s * (1 - 1e-9)
  else:
    assert heuristic.prediction.throughput_tps <= exact.prediction.throughput_tps * (1 + 1e-9)


def test_baseline_plan_reports_overfilled_nodes():
  # memory 8:4:2 GiB gives a, c, b 5, 3 and 2 layers, but b holds only floor(2 GiB * 0.9 / 1 GB) = 1
  plan = plan_for(mesh({"a": node(8, 100), "b": node(2, 100), "c": node(4, 100)}), MODEL, PlanRequest("ring-memory-weighted"))
  assert plan.ring() == [("a", 5), ("c", 3), ("b", 2)]
  assert not plan.prediction.feasible and plan.warnings == ["node 'b' is given 2 layers but its memory holds only 1"]
  topology = {"nodes": {"a": node(8, 100), "b": node(8, 100), "c": node(8, 100)}, "edges": [{"from": "a", "to": "b"}]}
  d = make_plan(topology, MODEL, strategy="ring-memory-weighted")
  assert any("share no edge" in w for w in d["warnings"])


# ---------- beyond the exact limit: rings that exist are found ----------

BIG = {"id": "big", "n_layers": 80, "layer_bytes": 5e8, "layer_flops": 1e9, "activation_bytes": 8192, "embed_bytes": 6e8, "head_bytes": 6e8}


def banded(n: int) -> dict:
  """Edges i - i+1 and i - i+2 only: a ring exists (0, 2, 4, ..., 5, 3, 1) but nearest neighbour and 2-opt miss it."""
  nodes = {f"n{i:02d}": node(4, 100 + 10 * (i % 5), 10 + i % 7) for i in range(n)}  # 7 layers each, 5 at an end
  return {"nodes": nodes, "edges": [{"from": f"n{i:02d}", "to": f"n{j:02d}", "rtt_ms": 1 + i % 3} for i in range(n) for j in (i + 1, i + 2) if j < n]}


def two_sites(n: int) -> dict:
  """Two full meshes of n / 2 nodes joined by one link: no ring crosses a single link, so a ring must stay within a site."""
  names = [f"n{i:02d}" for i in range(n)]
  site = {name: i < n // 2 for i, name in enumerate(names)}
  edges = [{"from": a, "to": b, "rtt_ms": 1.0} for a, b in itertools.combinations(names, 2) if site[a] == site[b]]
  return {"nodes": {name: node(4, 100) for name in names}, "edges": edges + [{"from": names[0], "to": names[-1], "rtt_ms": 30.0}]}


def star(n: int) -> dict:
  """Leaves joined only to a router node: the only rings are a node alone and the router with one leaf."""
  nodes = {f"n{i:02d}": node(30, 100 + i) for i in range(n)}  # 53 layers each: no node alone, any pair holds the model
  return {"nodes": nodes, "edges": [{"from": "n00", "to": f"n{i:02d}", "rtt_ms": 1.0} for i in range(1, n)]}


def check_ring(topology: dict, plan: dict) -> list[str]:
  ids = [s["node_id"] for s in plan["shards"]]
  assert sum(s["end_layer"] - s["start_layer"] + 1 for s in plan["shards"]) == 80 and plan["predicted"]["feasible"]
  pairs = {frozenset((e["from"], e["to"])) for e in topology["edges"]}
  assert len(ids) == 1 or all(frozenset((a, b)) in pairs for a, b in zip(ids, ids[1:] + ids[:1]))
  return ids


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("n", [12, 16, 40])
def test_heuristic_finds_rings_on_banded_topologies(n, objective):
  check_ring(banded(n), make_plan(banded(n), BIG, objective=objective))


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_heuristic_keeps_the_ring_within_one_site(objective):
  topology = two_sites(40)  # 20 nodes of 7 layers a site
  ids = check_ring(topology, make_plan(topology, BIG, objective=objective))
  assert len({int(name[1:]) < 20 for name in ids}) == 1
  with pytest.raises(ExoError, match="no ring can hold"):  # 8 nodes a site hold 56 layers: only both sites would, and no ring joins them
    make_plan(two_sites(16), BIG, objective=objective)


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_heuristic_finds_the_router_and_a_leaf_on_a_star(objective):
  topology = star(24)
  ids = check_ring(topology, make_plan(topology, BIG, objective=objective))
  assert len(ids) == 2 and "n00" in ids


@pytest.mark.parametrize("shape", [banded, two_sites, star])
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_heuristic_finds_a_ring_whenever_the_exact_search_does(shape, objective):
  """Up to 10 nodes the exact search is the reference: the heuristic must plan exactly when it does."""
  for n in range(2, 11):
    topology = Topology.from_dict(shape(n))
    outcomes = []
    for method in ("exact", "heuristic"):
      try:
        outcomes.append(FlopsLatencyPartitioningStrategy(ModelSpec.from_dict(BIG), objective, method=method).plan(topology))
      except ExoError:
        outcomes.append(None)
    assert (outcomes[0] is None) == (outcomes[1] is None), f"{shape.__name__}({n}): exact {outcomes[0]}, heuristic {outcomes[1]}"
