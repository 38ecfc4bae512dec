"""Cost model v2 (docs/DESIGN.md section 2) against hand calculations."""

import pytest

from exo.base.device_capabilities import LayerTimes
from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.topology.cost_model import PlannerParams, cost_model, layer_speed, layer_time, requests_held

MODEL = ModelSpec("m", n_layers=10, layer_bytes=1e9, layer_flops=2e9, activation_bytes=8192, kv_bytes_per_layer=0)
EMBED_HEAD = ModelSpec("m", 10, 1e9, 2e9, 8192, kv_bytes_per_layer=1e8, embed_bytes=1.5e9, head_bytes=2e9)


def two_nodes(extra_a: dict | None = None) -> Topology:
  return Topology.from_dict(
    {
      "nodes": {
        "a": {"memory": 8192, "flops": {"fp16": 10}, "memory_bandwidth": 100, **(extra_a or {})},
        "b": {"memory": 8192, "memory_bandwidth": 50},
      },
      "edges": [{"from": "a", "to": "b", "rtt_ms": 4, "bandwidth_mbps": 1000}, {"from": "b", "to": "a", "rtt_ms": 6}],
    }
  )


def test_roofline_takes_the_slower_bound_and_drops_unknowns():
  assert layer_speed(MODEL, 10, 100) == (0.01, 2e-4)  # 10 ms of weight streaming per token, 0.2 ms of compute per token
  assert layer_speed(MODEL, 10, 0) == (2e-4, 2e-4)
  assert layer_speed(MODEL, 0, 100) == (0.01, 0.0)
  assert layer_speed(MODEL, 0, 0) is None
  assert layer_time((0.01, 2e-4), 1) == 0.01 and layer_time((0.01, 2e-4), 100) == pytest.approx(0.02)


def test_measured_layer_times_win_over_the_roofline():
  assert layer_speed(MODEL, 10, 100, LayerTimes(3.0, 0.5)) == (0.003, 0.0005)
  costs = cost_model(
    two_nodes({"layer_times": {"m": {"decode_ms": 3.0, "token_ms": 0.5}, "other": {"decode_ms": 99, "token_ms": 9}}}), MODEL, PlannerParams()
  )
  assert costs.times(1) == [0.003, 0.02] and costs.times(10) == pytest.approx([0.005, 0.02])


def test_capacity_keeps_headroom_reserves_kv_and_the_embedding_and_head():
  costs = cost_model(two_nodes(), MODEL, PlannerParams())
  assert costs.capacity(0) == 7  # 8192 MiB * 0.9 = 7.73 GB -> 7 layers of 1 GB
  kv = cost_model(two_nodes(), EMBED_HEAD, PlannerParams(batch=2), "latency")
  usable = 8192 * 2**20 * 0.9  # 7.730941 GB
  assert kv.capacity(0) == int(usable // 1.1e9) == 7
  assert kv.capacity(0, first=True) == int((usable - 1.5e9) // 1.1e9) == 5
  assert kv.capacity(0, last=True) == int((usable - 2e9) // 1.1e9) == 5
  assert kv.capacity(0, first=True, last=True) == int((usable - 3.5e9) // 1.1e9) == 3  # untied: both matrices
  tied = cost_model(two_nodes(), ModelSpec("m", 10, 1e9, 2e9, 8192, 1e8, 1.5e9, 2e9, tied_embeddings=True), PlannerParams())
  assert tied.capacity(0, first=True, last=True) == int((usable - 2e9) // 1.1e9) == 5  # one matrix, held once
  assert tied.capacity(0, first=True) == 5  # on different nodes each end holds its own copy
  # throughput: k micro-batches of b requests each keep a KV cache on every stage
  busy = cost_model(two_nodes(), EMBED_HEAD, PlannerParams(batch=2), "throughput")
  assert busy.capacity(0, ring_size=3) == int(usable // (1e9 + 6 * 1e8)) == 4


def test_predictions_by_hand():
  costs = cost_model(two_nodes(), MODEL, PlannerParams(), prompt_tokens=10)
  a, b = costs.index("a"), costs.index("b")
  assert costs.times(1) == [0.01, 0.02]
  hop = 0.005 / 2 + 8192 * 8 / 1e9  # mean RTT 5 ms halved, plus 65.5 us to push 8 KiB over 1 Gbit/s
  assert costs.hop[a, b] == pytest.approx(hop) and costs.hop[b, a] == pytest.approx(hop)
  p = costs.evaluate([a, b], [6, 4])
  assert p.tpot_s == pytest.approx(6 * 0.01 + 4 * 0.02 + 2 * hop)
  assert p.throughput_tps == pytest.approx(1 / (4 * 0.02 + 8192 * 8 / 1e9))
  # prefill of 10 tokens: a is still bandwidth bound (2 ms compute < 10 ms), b's compute is unknown; hops carry 10 activations
  assert p.ttft_s == pytest.approx(0.06 + 0.08 + 2 * (0.0025 + 10 * 8192 * 8 / 1e9))
  assert p.feasible
  assert not costs.evaluate([a, b], [8, 2]).feasible
  d = p.to_dict()
  assert d["tokens_per_second"] == pytest.approx(1 / p.tpot_s) and d["tpot_ms"] == pytest.approx(p.tpot_s * 1000)


def test_head_time_batch_and_measured_prefill_by_hand():
  """a measured at 3 ms a layer and 0.5 ms per extra token; the head is 2 layers' bytes, so eta = 2 layers of time on the last."""
  model = ModelSpec("m", 10, 1e9, 2e9, 8192, head_bytes=2e9)
  topology = two_nodes({"layer_times": {"m": {"decode_ms": 3.0, "token_ms": 0.5}}})
  costs = cost_model(topology, model, PlannerParams(batch=8), "throughput", prompt_tokens=10)
  a, b = costs.index("a"), costs.index("b")
  p = costs.evaluate([b, a], [4, 6])  # b first, a last (runs the head)
  hop = 0.0025 + 8192 * 8 / 1e9
  assert p.tpot_s == pytest.approx(4 * 0.02 + (6 + 2) * 0.003 + 2 * hop)
  # at batch 8: a's layer takes max(3, 8 x 0.5) = 4 ms; b stays 20 ms (bandwidth bound, compute unknown)
  stage_b, stage_a = 4 * 0.02 + 8 * 8192 * 8 / 1e9, (6 + 2) * 0.004 + 8 * 8192 * 8 / 1e9
  assert p.throughput_tps == pytest.approx(8 / max(stage_a, stage_b))
  # prefill of 10: a's layer takes max(3, 10 x 0.5) = 5 ms
  assert p.ttft_s == pytest.approx(4 * 0.02 + 8 * 0.005 + 2 * (0.0025 + 10 * 8192 * 8 / 1e9))


def test_single_node_has_no_hops():
  costs = cost_model(two_nodes(), MODEL, PlannerParams())
  p = costs.evaluate([0], [7])
  assert p.tpot_s == pytest.approx(0.07) and p.throughput_tps == pytest.approx(1 / 0.07)


def test_unknown_speed_is_the_slowest_known_for_every_token_count_and_is_warned_about():
  t = two_nodes({"layer_times": {"m": {"decode_ms": 1.0, "token_ms": 1.0}}})
  t.update_node("c", Topology.from_dict({"nodes": {"c": {"memory": 1024}}}).nodes["c"])
  costs = cost_model(t, MODEL, PlannerParams())
  c = costs.index("c")
  assert costs.times(1)[c] == 0.02 and costs.times(100)[c] == pytest.approx(0.1)  # b for one token, a (100 x 1 ms) for 100
  assert costs.warnings() == ["node 'c' has unknown speed: assumed as slow as the slowest known node (20.000 ms per layer)"]
  alone = cost_model(t, MODEL, PlannerParams(), prompt_tokens=100).evaluate([c], [1])
  assert alone.tpot_s == pytest.approx(0.02) and alone.ttft_s == pytest.approx(0.1)  # one rule for TPOT and TTFT


def test_unmeasured_neighbours_get_the_default_rtt():
  t = Topology.from_dict({"nodes": {"a": {"memory_bandwidth": 1}, "b": {"memory_bandwidth": 1}}, "edges": [{"from": "a", "to": "b"}]})
  costs = cost_model(t, MODEL, PlannerParams(default_rtt_ms=8.0))
  assert costs.hop[0, 1] == pytest.approx(0.004)


def test_no_known_speed_means_no_timing_prediction():
  t = Topology.from_dict({"nodes": {"a": {"memory": 8192}}})
  costs = cost_model(t, MODEL, PlannerParams())
  assert not costs.speed_known() and "memory-weighted" in costs.warnings()[0]
  assert costs.evaluate([0], [7]).to_dict() == {
    "tpot_ms": None,
    "tokens_per_second": None,
    "throughput_tps": None,
    "ttft_ms": None,
    "feasible": False,  # the node holds its 7 layers, but a plan must hold all 10
    "bound_tpot_ms": None,
    "bound_throughput_tps": None,
  }
  seven = ModelSpec("m", n_layers=7, layer_bytes=1e9, layer_flops=2e9, activation_bytes=8192, kv_bytes_per_layer=0)
  assert cost_model(t, seven, PlannerParams()).evaluate([0], [7]).feasible  # all 7 layers, within the node's 7


def test_unknown_memory_holds_nothing_and_is_warned_about():
  t = Topology.from_dict({"nodes": {"a": {"memory": 8192, "memory_bandwidth": 1}, "b": {"memory_bandwidth": 1}}})
  costs = cost_model(t, MODEL, PlannerParams())
  assert [costs.capacity(0), costs.capacity(1)] == [7, 0]
  assert costs.warnings() == ["node 'b' has unknown memory (0 MB): it holds no layers"]


def test_requests_held_beside_a_shard_by_hand():
  """EMBED_HEAD: 1 GB layers, K = 0.1 GB a layer at its context of 8192 tokens, E 1.5 GB, H 2 GB. 10 GB usable."""
  usable = 10e9
  middle = Shard("m", 3, 5, 10)  # 3 GB of layers: 7 GB left; at 4096 tokens a request reserves 3 x 0.05 GB
  assert requests_held(EMBED_HEAD, usable, middle, 4096) == 46  # floor(7 / 0.15)
  assert requests_held(EMBED_HEAD, usable, middle, 8192) == 23  # floor(7 / 0.3)
  first_last = Shard("m", 0, 4, 5)  # not tied: 5 GB of layers + 1.5 + 2 = 8.5 GB; 1.5 GB left over 5 x 0.1 GB
  assert requests_held(ModelSpec("m", 5, 1e9, 2e9, 8192, 1e8, 1.5e9, 2e9), usable, first_last, 8192) == 3
  assert requests_held(EMBED_HEAD, 1e9, middle, 8192) == 0  # the layers alone do not fit: none
  assert requests_held(MODEL, usable, middle, 8192) is None  # no KV size: unbounded
  assert requests_held(EMBED_HEAD, 0, middle, 8192) is None  # unknown memory
