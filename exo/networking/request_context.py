"""What travels with every message of a request: its id, where results go, the token budget, how tokens are sampled, and the ring
plan chosen once, with the context it was planned for (every stage keeps each request's KV cache for that many positions)."""

from dataclasses import dataclass, replace

from exo.base.shard import Shard
from exo.inference.sampling import GREEDY, Sampling


@dataclass(frozen=True)
class RingStage:
  node_id: str
  start_layer: int
  end_layer: int  # inclusive


@dataclass(frozen=True)
class RingPlan:
  """The ring a request runs on: stages in execution order over a model with n_layers layers, and the context the plan reserved
  KV for (positions the request may reach, prompt and answer together; 0: the model's default, as from a sender that predates it)."""

  model_id: str
  n_layers: int
  stages: tuple[RingStage, ...]
  context_tokens: int = 0

  @staticmethod
  def from_node_shards(node_shards: list[tuple[str, Shard]], context_tokens: int = 0) -> "RingPlan":
    first = node_shards[0][1]
    stages = tuple(RingStage(n, s.start_layer, s.end_layer) for n, s in node_shards)
    return RingPlan(first.model_id, first.n_layers, stages, context_tokens)

  def node_ids(self) -> list[str]:
    return [s.node_id for s in self.stages]

  def shard(self, index: int) -> Shard:
    stage = self.stages[index]
    return Shard(self.model_id, stage.start_layer, stage.end_layer, self.n_layers)

  def index_of(self, shard: Shard, node_id: str) -> int | None:
    """Position of `node_id` holding exactly `shard` in this ring, or None."""
    for i, stage in enumerate(self.stages):
      if stage.node_id == node_id and (stage.start_layer, stage.end_layer) == (shard.start_layer, shard.end_layer):
        return i
    return None

  def validate(self) -> None:
    """Raise ValueError unless the stages are contiguous, start at layer 0, end at the last layer and name distinct nodes."""
    if not self.stages or self.n_layers < 1:
      raise ValueError("a ring plan needs at least one stage and one layer")
    expected = 0
    for stage in self.stages:
      if stage.start_layer != expected or stage.end_layer < stage.start_layer:
        raise ValueError(f"ring plan stages are not contiguous at node {stage.node_id!r}")
      expected = stage.end_layer + 1
    if expected != self.n_layers:
      raise ValueError(f"ring plan covers {expected} of {self.n_layers} layers")
    if len(set(self.node_ids())) != len(self.stages):
      raise ValueError("ring plan names a node twice")
    if self.context_tokens < 0:
      raise ValueError(f"ring plan has a context of {self.context_tokens} tokens; expected 0 (the model's default) or more")


@dataclass(frozen=True)
class RequestContext:
  request_id: str
  origin_node_id: str
  plan: RingPlan
  max_tokens: int
  position: int = 0  # position of the message's first token: 0 for the prompt, then prompt length + tokens generated before it
  sampling: Sampling = GREEDY  # how the last stage chooses each token

  def at(self, position: int) -> "RequestContext":
    """The same request's context for a message starting at `position`."""
    return replace(self, position=position)
