from exo.base.topology import Topology
from exo.topology.partitioning_strategy import Partition, PartitioningStrategy

__all__ = ["RingMemoryWeightedPartitioningStrategy"]


class RingMemoryWeightedPartitioningStrategy(PartitioningStrategy):
  """Upstream's baseline, kept exactly: ring sorted by (memory, node id) descending, each share proportional to memory, rounded to 5 places."""

  def partition(self, topology: Topology) -> list[Partition]:
    nodes = sorted(topology.all_nodes(), key=lambda item: (item[1].memory, item[0]), reverse=True)
    total_memory = sum(caps.memory for _, caps in nodes)
    partitions, start = [], 0
    for node_id, caps in nodes:
      end = round(start + caps.memory / total_memory, 5)
      partitions.append(Partition(node_id, start, end))
      start = end
    return partitions
