"""Plans that know what each node holds (exo.topology.holdings): the bytes a ring node still fetches and how long at the measured
link, by hand; among plans of equal predicted speed, the one whose nodes hold their layers, against the plan made without
holdings and an exhaustive count of the layers each possible ring would fetch."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo.base.model_spec import ModelSpec
from exo.base.topology import Topology
from exo.topology.flops_latency_partitioning_strategy import FlopsLatencyPartitioningStrategy
from exo.topology.holdings import downloads, needed_bytes

SPLIT = ModelSpec("m", n_layers=6, layer_bytes=1e8, layer_flops=2e8, activation_bytes=4096, embed_bytes=3e7, head_bytes=5e7)
ONE_FILE = ModelSpec("m", n_layers=6, layer_bytes=1e8, layer_flops=2e8, activation_bytes=4096, file_bytes=7e8)
NODE = {"memory": 500, "flops": {"fp16": 10}, "memory_bandwidth": 100}  # 500 MB: four of six 100 MB layers; two nodes hold the model


def cluster(holdings: dict[str, list[list[int]]], bandwidth: dict[tuple[str, str], float] | None = None, nodes: str = "abc") -> Topology:
  bandwidth = bandwidth or {}
  edges = [
    {"from": u, "to": v, "rtt_ms": 2, **({"bandwidth_mbps": bandwidth[(u, v)]} if (u, v) in bandwidth else {})}
    for u in nodes
    for v in nodes
    if u != v
  ]
  return Topology.from_dict({"nodes": {n: {**NODE, **({"holdings": {"m": holdings[n]}} if n in holdings else {})} for n in nodes}, "edges": edges})


def test_needed_bytes_by_hand():
  assert needed_bytes(SPLIT, frozenset(range(6)), 0, 5) == 0
  assert needed_bytes(SPLIT, frozenset({1, 2}), 0, 2) == 1e8 + 3e7  # layer 0 and the embedding
  assert needed_bytes(SPLIT, frozenset(), 3, 5) == 3e8 + 5e7  # three layers and the head
  assert needed_bytes(SPLIT, frozenset({5}), 3, 5) == 2e8  # holds the last layer: the head is there too
  assert needed_bytes(ONE_FILE, frozenset({0, 1}), 0, 2) == 7e8  # a GGUF file comes whole
  assert needed_bytes(ONE_FILE, frozenset(range(6)), 0, 2) == 0


def test_a_plan_reports_the_bytes_each_node_fetches_and_the_time_at_the_best_measured_link():
  """c holds every layer, a and b nothing; a's link from c is measured at 800 Mbit/s, b's from c not at all."""
  topology = cluster({"c": [[0, 5]]}, {("c", "a"): 800.0, ("a", "c"): 800.0})
  plan = FlopsLatencyPartitioningStrategy(ONE_FILE).plan(topology)
  got = {d.node_id: (d.bytes, d.seconds) for d in downloads(topology, ONE_FILE, plan.stages)}
  assert set(got) == {node_id for node_id, _ in plan.stages}
  assert "c" in got and got["c"] == (0, 0.0)  # c, the one holder, is in the ring (all three nodes are as fast)
  for node_id in set(got) - {"c"}:
    assert got[node_id] == (7e8, 7e8 * 8 / 800e6 if node_id == "a" else None)


def lacking(stages: list[tuple[str, int]], holdings: dict[str, set[int]]) -> int:
  count, start = 0, 0
  for node_id, layers in stages:
    count += sum(layer not in holdings.get(node_id, set()) for layer in range(start, start + layers))
    start += layers
  return count


@given(st.dictionaries(st.sampled_from("abc"), st.sets(st.integers(0, 5), min_size=1), max_size=3))
def test_among_equally_fast_plans_the_one_whose_nodes_hold_their_layers(held):
  """Identical nodes: every ring of two of them, in either order, with the same layer split, is equally fast. The plan with
  holdings is as fast as the plan without them, and fetches no more layers than the best such ring (counted exhaustively)."""
  holdings = {n: [[layer, layer] for layer in sorted(layers)] for n, layers in held.items()}
  plain = FlopsLatencyPartitioningStrategy(SPLIT).plan(cluster({}))
  plan = FlopsLatencyPartitioningStrategy(SPLIT).plan(cluster(holdings))
  assert plan.prediction.tpot_s == pytest.approx(plain.prediction.tpot_s, rel=1e-9)
  assert plan.prediction.ttft_s == pytest.approx(plain.prediction.ttft_s, rel=1e-9)
  split = [layers for _, layers in plain.stages]
  best = min(lacking(list(zip(ring, split)), held) for ring in itertools.permutations("abc", len(split)))
  assert [layers for _, layers in plan.stages] == split and lacking(plan.stages, held) == best


def test_holdings_never_make_a_plan_slower():
  """b is twice as fast as a and c: the plan keeps b though only c holds the layers b would run."""
  topology = cluster({"c": [[0, 5]]})
  topology.nodes["b"] = Topology.from_dict({"nodes": {"b": {**NODE, "flops": {"fp16": 20}, "memory_bandwidth": 200}}}).nodes["b"]
  plain = cluster({})
  plain.nodes["b"] = topology.nodes["b"]
  with_holdings, without = (FlopsLatencyPartitioningStrategy(SPLIT).plan(t) for t in (topology, plain))
  assert with_holdings.prediction.tpot_s == pytest.approx(without.prediction.tpot_s, rel=1e-9)
  assert "b" in dict(with_holdings.stages)
