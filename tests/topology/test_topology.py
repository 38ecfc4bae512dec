import json

import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.errors import ExoError
from exo.base.topology import Topology

STUDIO = {
  "model": "Mac Studio",
  "chip": "Apple M2 Ultra",
  "memory": 196608,
  "flops": {"fp32": 27.2, "fp16": 54.4, "int8": 108.8},
  "memory_bandwidth": 800,
}


def topology_dict(**extra_edge):
  edge = {"from": "studio", "to": "air", "rtt_ms": 3.1, "bandwidth_mbps": 1000, **extra_edge}
  return {"nodes": {"studio": STUDIO, "air": {"memory": 16384}}, "edges": [edge]}


def test_round_trip_through_json(tmp_path):
  path = tmp_path / "topology.json"
  original = Topology.from_dict(topology_dict())
  path.write_text(original.to_json())
  loaded = Topology.load(path)
  assert loaded == original
  assert loaded.nodes["studio"] == DeviceCapabilities("Mac Studio", "Apple M2 Ultra", 196608, DeviceFlops(27.2, 54.4, 108.8), 800)
  assert loaded.nodes["air"].memory_bandwidth == 0  # absent means unknown
  assert json.loads(path.read_text())["edges"] == [{"from": "studio", "to": "air", "rtt_ms": 3.1, "bandwidth_mbps": 1000}]


def test_pair_figures_average_the_directions_that_measured():
  t = Topology.from_dict(topology_dict())
  t.add_edge("air", "studio", rtt_ms=4.9)
  assert t.pair_rtt_ms("air", "studio") == pytest.approx((3.1 + 4.9) / 2)
  assert t.pair_bandwidth_mbps("air", "studio") == 1000  # only one direction gave a bandwidth
  t.add_edge("air", "studio")
  assert t.pair_rtt_ms("studio", "air") == 3.1
  assert t.neighbours("air") == ["studio"] and t.are_neighbours("air", "studio")


def test_unmeasured_pair_has_no_rtt_and_strangers_are_not_neighbours():
  t = Topology.from_dict({"nodes": {"a": {}, "b": {}, "c": {}}, "edges": [{"from": "a", "to": "b"}]})
  assert t.pair_rtt_ms("a", "b") is None
  assert not t.are_neighbours("a", "c")


@pytest.mark.parametrize(
  "text, message",
  [
    ('{"nodes": {"a": {"memory": 1, "colour": "red"}}}', "unknown key 'colour'"),
    ('{"nodes": {"a": {"flops": {"fp64": 1}}}}', "unknown key 'fp64'"),
    ('{"nodes": {"a": {}}, "links": []}', "unknown key 'links'"),
    ('{"nodes": {"a": {"memory": NaN}}}', "NaN"),
    ('{"nodes": {"a": {"memory": -5}}}', "memory must be a number from 0 to 1e\\+15, got -5"),
    ('{"nodes": {"a": {"memory_bandwidth": "fast"}}}', "memory_bandwidth must be a number, got 'fast'"),
    ('{"nodes": {"a": {}, "a": {}}}', "duplicate key 'a'"),
    ('{"nodes": {"a": {}}, "edges": [{"from": "a", "to": "ghost"}]}', "unknown node 'ghost'"),
    ('{"nodes": {"a": {}, "b": {}}, "edges": [{"from": "a", "to": "b"}, {"from": "a", "to": "b"}]}', "duplicate edge"),
    ('{"nodes": {"a": {}}, "edges": [{"from": "a", "to": "a"}]}', "to itself"),
    ('{"nodes": {"a": {}, "b": {}}, "edges": [{"from": "a", "to": "b", "rtt_ms": -1}]}', "rtt_ms must be a number from 0 to 1e\\+15"),
    ('{"nodes": {}}', "non-empty"),
    ('{"nodes": {"a": {}}', "not valid JSON"),
  ],
)
def test_bad_topology_gives_one_clear_error(text, message):
  with pytest.raises(ExoError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
    Topology.from_json(text)
  assert "\n" not in str(err.value)


def test_missing_file_is_a_plan_error(tmp_path):
  with pytest.raises(ExoError, match="cannot read topology file"):
    Topology.load(tmp_path / "nope.json")
