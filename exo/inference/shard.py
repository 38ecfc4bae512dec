"""Upstream's import path for a shard, which the inference engines and the wire use; the type itself is the planner's."""

from exo.topology.shard import Shard

__all__ = ["Shard"]
