from exo.base.device_capabilities import DeviceCapabilities
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.topology.partitioning_strategy import (
  Partition,
  map_partitions_to_node_shards,
  map_partitions_to_shards,
  partitions_from_layer_counts,
)
from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy


def test_shards_from_upstream_style_partitions():
  partitions = [Partition("n1", 0.0, 0.42857), Partition("n2", 0.42857, 0.71428), Partition("n3", 0.71428, 1.0)]
  # 0.42857 * 32 = 13.7 -> layers 0..12; 0.71428 * 32 = 22.9 -> 13..21; the last shard always ends at the last layer
  assert map_partitions_to_shards(partitions, 32, "m") == [Shard("m", 0, 12, 32), Shard("m", 13, 21, 32), Shard("m", 22, 31, 32)]


def test_empty_partition_drops_out_without_shifting_later_nodes():
  partitions = [Partition("a", 0.0, 0.5), Partition("b", 0.5, 0.5), Partition("c", 0.5, 1.0)]
  assert map_partitions_to_node_shards(partitions, 10, "m") == [("a", Shard("m", 0, 4, 10)), ("c", Shard("m", 5, 9, 10))]


def test_boundaries_that_floats_cannot_represent_still_land_on_whole_layers():
  # 29/100 * 100 is 28.999999999999996 in floating point: truncation would give node a only 28 layers
  counts = [("a", 29), ("b", 57), ("c", 14)]
  shards = map_partitions_to_node_shards(partitions_from_layer_counts(counts, 100), 100, "m")
  assert [(node, s.get_layer_count()) for node, s in shards] == counts


def test_every_split_of_a_small_model_survives_the_round_trip():
  for n in range(1, 13):
    for a in range(1, n):
      for b in range(1, n - a + 1):
        counts = [("x", a), ("y", b)] + ([("z", n - a - b)] if n - a - b else [])
        shards = map_partitions_to_node_shards(partitions_from_layer_counts(counts, n), n, "m")
        assert [(node, s.get_layer_count()) for node, s in shards] == counts


def _topology(memories: dict) -> Topology:
  t = Topology()
  for node_id, memory in memories.items():
    t.update_node(node_id, DeviceCapabilities(memory=memory))
  return t


def test_ring_memory_weighted_matches_upstream():
  partitions = RingMemoryWeightedPartitioningStrategy().partition(_topology({"node1": 3000, "node2": 1000, "node3": 6000}))
  assert partitions == [Partition("node3", 0, 0.6), Partition("node1", 0.6, 0.9), Partition("node2", 0.9, 1.0)]


def test_ring_memory_weighted_breaks_memory_ties_by_node_id_descending_and_rounds_to_5_places():
  partitions = RingMemoryWeightedPartitioningStrategy().partition(_topology({"a": 1000, "b": 1000, "c": 1000}))
  assert [p.node_id for p in partitions] == ["c", "b", "a"]
  # upstream rounds the running end, so thirds drift to 0.99999; the last shard still ends at the last layer
  assert [(p.start, p.end) for p in partitions] == [(0, 0.33333), (0.33333, 0.66666), (0.66666, 0.99999)]
  assert map_partitions_to_shards(partitions, 30, "m") == [Shard("m", 0, 8, 30), Shard("m", 9, 18, 30), Shard("m", 19, 29, 30)]
