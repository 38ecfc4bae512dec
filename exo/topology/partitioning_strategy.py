"""Upstream's seam: a strategy turns a topology into an ordered ring of partitions; partitions map to layer shards."""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from exo.base.shard import Shard
from exo.base.topology import Topology

__all__ = [
  "Partition",
  "PartitioningStrategy",
  "layer_boundary",
  "map_partitions_to_node_shards",
  "map_partitions_to_shards",
  "partitions_from_layer_counts",
]

_BOUNDARY_EPS = 1e-9  # a boundary like 0.3 * 10 computes as 2.9999999999999996 and must still mean layer 3


@dataclass(frozen=True)
class Partition:
  """Node `node_id` holds the fraction [start, end) of the layers; list order is ring order."""

  node_id: str
  start: float
  end: float


class PartitioningStrategy(ABC):
  @abstractmethod
  def partition(self, topology: Topology) -> list[Partition]:
    pass


def layer_boundary(fraction: float, n_layers: int) -> int:
  return min(n_layers, math.floor(fraction * n_layers + _BOUNDARY_EPS))


def map_partitions_to_node_shards(partitions: list[Partition], n_layers: int, model_id: str) -> list[tuple[str, Shard]]:
  """(node id, shard) in ring order for every partition that holds at least one layer; the last shard ends at the last layer.

  Unlike upstream, the node id travels with its shard, so dropping an empty partition cannot shift later nodes onto the wrong layers.
  """
  out = []
  for i, partition in enumerate(partitions):
    start = layer_boundary(partition.start, n_layers)
    end = n_layers if i == len(partitions) - 1 else layer_boundary(partition.end, n_layers)
    if end > start:
      out.append((partition.node_id, Shard(model_id, start, end - 1, n_layers)))
  return out


def map_partitions_to_shards(partitions: list[Partition], n_layers: int, model_id: str) -> list[Shard]:
  """Upstream's function: the non-empty shards in ring order."""
  return [shard for _, shard in map_partitions_to_node_shards(partitions, n_layers, model_id)]


def partitions_from_layer_counts(ring: list[tuple[str, int]], n_layers: int) -> list[Partition]:
  """Exact partitions for integer layer counts: start and end are multiples of 1/n_layers, so they map back to the same counts."""
  partitions, done = [], 0
  for node_id, count in ring:
    partitions.append(Partition(node_id, done / n_layers, (done + count) / n_layers))
    done += count
  return partitions
