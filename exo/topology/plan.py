"""A plan: the ring (node, layer count) in execution order with its predictions, and its JSON form (docs/DESIGN.md section 3)."""

from dataclasses import dataclass, field

from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.topology.cost_model import PlannerParams, Prediction
from exo.topology.partitioning_strategy import Partition, map_partitions_to_node_shards, partitions_from_layer_counts

__all__ = ["Plan"]


@dataclass
class Plan:
  strategy: str
  objective: str
  params: PlannerParams
  model: ModelSpec
  partitions: list[Partition]
  prediction: Prediction
  warnings: list[str] = field(default_factory=list)
  context_tokens: int = 0  # the context each request's KV is reserved for (docs/DESIGN.md v2.1); 0: the model's default

  def __post_init__(self):
    self.context_tokens = self.context_tokens or self.model.default_context()

  @staticmethod
  def from_ring(
    strategy: str, objective: str, params: PlannerParams, model: ModelSpec, ring: list[tuple[str, int]], prediction, warnings, context_tokens: int
  ) -> "Plan":
    return Plan(strategy, objective, params, model, partitions_from_layer_counts(ring, model.n_layers), prediction, warnings, context_tokens)

  def node_shards(self) -> list[tuple[str, Shard]]:
    return map_partitions_to_node_shards(self.partitions, self.model.n_layers, self.model.id)

  def ring(self) -> list[tuple[str, int]]:
    """(node id, layers held) for every node in the ring, in execution order."""
    return [(node_id, shard.get_layer_count()) for node_id, shard in self.node_shards()]

  def to_dict(self) -> dict:
    return {
      "strategy": self.strategy,
      "objective": self.objective,
      "params": self.params.to_dict(),
      "model": self.model.to_dict(),
      "context_tokens": self.context_tokens,
      "partitions": [{"node_id": p.node_id, "start": p.start, "end": p.end} for p in self.partitions],
      "shards": [
        {"node_id": node_id, "start_layer": s.start_layer, "end_layer": s.end_layer, "n_layers": s.n_layers} for node_id, s in self.node_shards()
      ],
      "predicted": self.prediction.to_dict(),
      "warnings": list(self.warnings),
    }
