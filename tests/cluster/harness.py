"""Test helpers around the local clusters of exo/tools/local_cluster.py: reading `exo run` output, reference tokens, a spying
engine, waiting for in-process nodes."""

import asyncio
import json
import time
from collections.abc import Callable

from exo.inference.engine_wrapper import EngineWrapper
from exo.tools.local_cluster import (  # noqa: F401  (the cluster tests import these from here with the helpers below)
  CLIENT,
  EXO,
  HOST,
  ROOT,
  RUN_TIMEOUT_S,
  START_TIMEOUT_S,
  Cluster,
  Device,
  NodeProcess,
  collect_topology,
  edge_rtts,
  free_port,
  mesh_complete,
)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("exo: error:")]


def plan_line(stderr: str) -> dict:
  """The plan `exo run --show-plan` printed on stderr (one JSON object on one line)."""
  plans = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
  if len(plans) != 1:
    raise AssertionError(f"expected exactly one plan line on stderr, got {len(plans)}: {stderr}")
  return plans[0]


def ring_of(plan: dict) -> list[tuple[str, int, int]]:
  """A plan's stages: (node id, first layer, last layer) in ring order."""
  return [(s["node_id"], s["start_layer"], s["end_layer"]) for s in plan["shards"]]


async def reference_tokens(model, prompt: str, max_tokens: int) -> list[int]:
  """The dummy engine's tokens for `prompt` with the whole model as one shard on one engine: what every ring must reproduce."""
  from exo.base.shard import Shard
  from exo.inference.dummy_inference_engine import DummyInferenceEngine
  from tests.support.greedy import greedy_tokens

  engine, shard = DummyInferenceEngine(), Shard(model.id, 0, model.n_layers - 1, model.n_layers)
  return await greedy_tokens(engine, shard, await engine.encode(shard, prompt), max_tokens)


class Spy(EngineWrapper):
  """An engine wrapper recording (request id, node id, first layer, last layer) for every step it runs, and (request id, node
  id) for every request its node tells it is over, in `finished`; `changed()`, if given, is called after each record."""

  def __init__(self, inner, node_id: str, calls: list, finished: list | None = None, changed: Callable[[], None] | None = None):
    super().__init__(inner)
    self.node_id, self.calls, self.finished, self.changed = node_id, calls, finished if finished is not None else [], changed

  async def infer_batch(self, shard, steps):
    self.calls.extend((step.request_id, self.node_id, shard.start_layer, shard.end_layer) for step in steps)
    if self.changed is not None:
      self.changed()
    return await self.inner.infer_batch(shard, steps)

  async def finish_request(self, request_id):
    self.finished.append((request_id, self.node_id))
    if self.changed is not None:
      self.changed()
    await self.inner.finish_request(request_id)

  def __getattr__(self, name):
    return getattr(self.inner, name)


async def wait_for_local_mesh(nodes, timeout: float = START_TIMEOUT_S) -> None:
  """Wait until every in-process node has measured the RTT of every link between them."""
  deadline = time.monotonic() + timeout
  ids = [node.id for node in nodes]
  while not all(all(node.topology.edges.get((u, v)) and node.topology.edges[(u, v)].rtt_ms for u in ids for v in ids if u != v) for node in nodes):
    assert time.monotonic() < deadline, "the in-process nodes did not measure every link"
    await asyncio.sleep(0.1)
