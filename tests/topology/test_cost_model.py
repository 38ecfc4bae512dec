import pytest

from exo.topology.cost_model import PlannerParams, cluster_costs, layer_capacity, predict, roofline_layer_time
from exo.topology.model_spec import ModelSpec
from exo.topology.topology import Topology

MODEL = ModelSpec("m", n_layers=10, layer_bytes=1e9, layer_flops=2e9, activation_bytes=8192, kv_bytes_per_layer=0)


def two_nodes() -> Topology:
  return Topology.from_dict(
    {
      "nodes": {
        "a": {"memory": 8192, "flops": {"fp16": 10}, "memory_bandwidth": 100},
        "b": {"memory": 8192, "memory_bandwidth": 50},
      },
      "edges": [{"from": "a", "to": "b", "rtt_ms": 4, "bandwidth_mbps": 1000}, {"from": "b", "to": "a", "rtt_ms": 6}],
    }
  )


def test_roofline_takes_the_slower_bound_and_drops_unknowns():
  assert roofline_layer_time(2e9, 1e9, 10, 100) == 0.01  # 0.2 ms of compute, 10 ms of weight streaming
  assert roofline_layer_time(2e9, 1e9, 10, 0) == 2e-4
  assert roofline_layer_time(2e9, 1e9, 0, 0) is None


def test_capacity_keeps_headroom_and_reserves_kv():
  assert layer_capacity(8192, MODEL, 0.1) == 7  # 8192 MiB * 0.9 = 7.73 GB -> 7 layers of 1 GB
  with_kv = ModelSpec("m", 10, 1e9, 2e9, 8192, kv_bytes_per_layer=1e9)
  assert layer_capacity(8192, with_kv, 0.1) == 3


def test_predictions_by_hand():
  costs = cluster_costs(two_nodes(), MODEL, PlannerParams())
  a, b = costs.index("a"), costs.index("b")
  assert costs.layer_time == [0.01, 0.02]
  hop = 0.005 / 2 + 8192 * 8 / 1e9  # mean RTT 5 ms halved, plus 65.5 us to push 8 KiB over 1 Gbit/s
  assert costs.hop[a][b] == pytest.approx(hop) and costs.hop[b][a] == pytest.approx(hop)
  p = predict(costs, [a, b], [6, 4], prompt_tokens=10)
  assert p.tpot_s == pytest.approx(6 * 0.01 + 4 * 0.02 + 2 * hop)
  assert p.bottleneck_s == pytest.approx(4 * 0.02 + 8192 * 8 / 1e9)
  # prefill of 10 tokens: a is still bandwidth bound (2 ms compute < 10 ms), b's compute is unknown; hops carry 10 activations
  assert p.ttft_s == pytest.approx(0.06 + 0.08 + 2 * (0.0025 + 10 * 8192 * 8 / 1e9))
  assert p.feasible
  assert not predict(costs, [a, b], [8, 2], 10).feasible
  d = p.to_dict()
  assert d["tokens_per_second"] == pytest.approx(1 / p.tpot_s) and d["tpot_ms"] == pytest.approx(p.tpot_s * 1000)


def test_single_node_has_no_hops():
  costs = cluster_costs(two_nodes(), MODEL, PlannerParams())
  p = predict(costs, [0], [7], 1)
  assert p.tpot_s == p.bottleneck_s == pytest.approx(0.07)


def test_unknown_speed_is_the_slowest_known_and_is_warned_about():
  t = two_nodes()
  t.update_node("c", Topology.from_dict({"nodes": {"c": {"memory": 1024}}}).nodes["c"])
  costs = cluster_costs(t, MODEL, PlannerParams())
  assert costs.layer_time[costs.index("c")] == 0.02
  assert costs.warnings() == ["node 'c' has unknown speed: assumed as slow as the slowest known node (20.000 ms per layer)"]


def test_unmeasured_neighbours_get_the_default_rtt():
  t = Topology.from_dict({"nodes": {"a": {"memory_bandwidth": 1}, "b": {"memory_bandwidth": 1}}, "edges": [{"from": "a", "to": "b"}]})
  costs = cluster_costs(t, MODEL, PlannerParams(default_rtt_ms=8.0))
  assert costs.hop[0][1] == pytest.approx(0.004)


def test_no_known_speed_means_no_timing_prediction():
  t = Topology.from_dict({"nodes": {"a": {"memory": 8192}}})
  costs = cluster_costs(t, MODEL, PlannerParams())
  assert costs.layer_time is None and "memory-weighted" in costs.warnings()[0]
  assert predict(costs, [0], [7], 1).to_dict() == {
    "tpot_ms": None,
    "tokens_per_second": None,
    "throughput_tps": None,
    "ttft_ms": None,
    "feasible": True,
  }


def test_unknown_memory_holds_nothing_and_is_warned_about():
  t = Topology.from_dict({"nodes": {"a": {"memory": 8192, "memory_bandwidth": 1}, "b": {"memory_bandwidth": 1}}})
  costs = cluster_costs(t, MODEL, PlannerParams())
  assert costs.capacity == [7, 0]
  assert costs.warnings() == ["node 'b' has unknown memory (0 MB): it holds no layers"]
