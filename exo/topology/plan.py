"""A plan: the ring (node, layer count) in execution order with its predictions, and its JSON form (docs/DESIGN.md section 3)."""

from dataclasses import dataclass, field

from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.topology.cost_model import CostModel, PlannerParams, Prediction
from exo.topology.partitioning_strategy import Partition, partitions_from_layer_counts

__all__ = ["Plan"]


@dataclass
class Plan:
  """`stages`: (node id, layers held) in execution order, whole layers; `costs`: the cost model that evaluated the plan (on the
  whole topology it was planned on), which `exo plan` shows it with."""

  strategy: str
  objective: str
  params: PlannerParams
  model: ModelSpec
  stages: list[tuple[str, int]]
  prediction: Prediction | None
  warnings: list[str] = field(default_factory=list)
  context_tokens: int = 0  # the context each request's KV is reserved for (docs/DESIGN.md v2.1); 0: the model's default
  costs: CostModel | None = field(default=None, repr=False, compare=False)
  given_partitions: list[Partition] | None = None  # the fractions a strategy that thinks in fractions (upstream's) returned

  def __post_init__(self):
    self.context_tokens = self.context_tokens or self.model.default_context()

  @property
  def partitions(self) -> list[Partition]:
    """The ring as upstream's PartitioningStrategy gives it: fractions of the model (the strategy's own, if it gave them)."""
    return self.given_partitions or partitions_from_layer_counts(self.stages, self.model.n_layers)

  def node_shards(self) -> list[tuple[str, Shard]]:
    shards, start = [], 0
    for node_id, layers in self.stages:
      shards.append((node_id, Shard(self.model.id, start, start + layers - 1, self.model.n_layers)))
      start += layers
    return shards

  def ring(self) -> list[tuple[str, int]]:
    """(node id, layers held) for every node in the ring, in execution order."""
    return list(self.stages)

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
