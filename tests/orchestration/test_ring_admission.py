"""What a node takes over gRPC from other members of its cluster (a real node, dummy engine, on loopback): a request starts only
with its prompt from its origin, within the planned context and the model's layers, counts in the node's load and limit, and
only its origin and ring may cancel it or report its tokens."""

import asyncio
import json
import logging

import numpy as np
import psutil
import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.errors import Busy
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.peer_handle import Refused
from exo.networking.request_context import RequestContext, RingPlan, RingStage
from exo.orchestration.node import Node
from tests.support.greedy import greedy_tokens
from tests.support.patience import STALL_S

MODEL = model_spec("llama-3.2-1b")  # 16 layers
DEVICE = DeviceCapabilities("Test Box", "Test Chip", 16384.0, DeviceFlops(10.0, 20.0, 40.0), 200.0)
WHOLE = Shard(MODEL.id, 0, MODEL.n_layers - 1, MODEL.n_layers)
FINISH = json.dumps({"type": "finish"})


class Counting(EngineWrapper):
  """Counts the steps the engine runs; with a `gate`, every call waits for it first (a request that stays running)."""

  def __init__(self, gate: asyncio.Event | None = None):
    super().__init__(DummyInferenceEngine(eos_after=10**9))
    self.gate, self.steps, self.entered = gate, 0, asyncio.Event()

  async def infer_batch(self, shard, steps):
    self.steps += len(steps)
    self.entered.set()
    if self.gate is not None:
      await self.gate.wait()
    return await self.inner.infer_batch(shard, steps)


def context(origin: str, request_id: str = "r1", context_tokens: int = 2048, max_tokens: int = 16, ring=(("n", WHOLE),)) -> RequestContext:
  return RequestContext(request_id, origin, RingPlan.from_node_shards(list(ring), context_tokens), max_tokens)


def with_node(test, max_requests: int = 64, gated: bool = False):
  """Run `await test(node, engine, member)` against node "n" serving gRPC on loopback; member(sender) is a handle to it from a
  node of the same cluster that gives `sender` as its id."""

  async def main():
    engine = Counting(asyncio.Event() if gated else None)
    node = Node("n", engine, NoDiscovery(), DEVICE, MODEL, request_timeout=STALL_S, max_requests=max_requests)
    node.server = GRPCServer(node, "127.0.0.1", 0)
    await node.start()
    handles = []

    def member(sender: str) -> GRPCPeerHandle:
      handles.append(GRPCPeerHandle("n", f"127.0.0.1:{node.server.port}", DEVICE, sender_id=sender))
      return handles[-1]

    try:
      await test(node, engine, member)
    finally:
      for handle in handles:
        await handle.disconnect()
      if engine.gate is not None:
        engine.gate.set()
      await node.stop()

  asyncio.run(main())


def test_a_ghost_prompt_naming_the_node_itself_as_origin_is_refused_and_nothing_runs():
  async def test(node, engine, member):
    for sender in ("n", "o"):  # the node's own id, claimed by the caller, or another's
      with pytest.raises(Refused, match="PERMISSION_DENIED: request r1 names node 'n' as its origin but did not come through its admission"):
        await member(sender).send_prompt(WHOLE, "hi", context("n", max_tokens=2**31 - 1))
    with pytest.raises(Refused, match="PERMISSION_DENIED: request r1's prompt came from 'p', not from its origin 'o'"):
      await member("p").send_prompt(WHOLE, "hi", context("o"))
    with pytest.raises(Refused, match="PERMISSION_DENIED: request r1: a request starts with its prompt"):  # token ids in place of one
      await member("n").send_tensor(WHOLE, np.array([[5, 6]], dtype=np.int64), context("o"))
    assert engine.steps == 0 and node.tasks_running() == 0 and node.load()["active_requests"] == 0

  with_node(test)


def test_an_over_context_prompt_is_refused_before_prefill():
  async def test(node, engine, member):
    origin = member("o")
    megabyte = "a" * 2**20  # the dummy engine's tokens are the prompt's bytes: 1048576 tokens
    with pytest.raises(Refused, match="INVALID_ARGUMENT: the prompt is 1048576 tokens, beyond the planned context of 2048 tokens"):
      await origin.send_prompt(WHOLE, megabyte, context("o"))
    with pytest.raises(Refused, match="the prompt is 1048576 tokens, beyond llama-3.2-1b's context of 1048576 tokens"):
      await origin.send_prompt(WHOLE, megabyte, context("o", context_tokens=0))  # 0: the model's own, the dummy engine's 2**20
    with pytest.raises(Refused, match="the prompt is 2000 tokens and max_tokens is 49: 2049 tokens, beyond the planned context of 2048"):
      await origin.send_prompt(WHOLE, "b" * 2000, context("o", max_tokens=49))
    assert engine.steps == 0 and node.tasks_running() == 0 and node.load()["active_requests"] == 0
    await origin.send_prompt(WHOLE, "b" * 2000, context("o", max_tokens=48))  # what fits exactly runs
    await asyncio.wait_for(engine.entered.wait(), STALL_S)

  with_node(test)


def test_a_shard_of_two_billion_layers_is_refused_before_anything_is_allocated():
  ghost = Shard(MODEL.id, 0, 2**31 - 2, 2**31 - 1)
  ghost_ring = RingPlan(MODEL.id, 2**31 - 1, (RingStage("n", 0, 2**31 - 2),), 2048)
  wrong = Shard(MODEL.id, 0, 16, 17)  # within what any model may have, but not this model's 16

  async def test(node, engine, member):
    origin, rss = member("o"), psutil.Process().memory_info().rss
    with pytest.raises(Refused, match="INVALID_ARGUMENT: shard n_layers 2147483647 is beyond 10000"):
      await origin.send_prompt(ghost, "hi", RequestContext("r1", "o", ghost_ring, 4))
    with pytest.raises(Refused, match="INVALID_ARGUMENT: shard n_layers 2147483647 is beyond 10000"):
      await origin.send_tensor(ghost, np.zeros((1, 1, 8), dtype=np.float32), RequestContext("r2", "o", ghost_ring, 4))
    with pytest.raises(Refused, match="INVALID_ARGUMENT: llama-3.2-1b has 16 layers; the request's plan says 17"):
      await origin.send_prompt(wrong, "hi", context("o", ring=(("n", wrong),)))
    assert psutil.Process().memory_info().rss - rss < 50 * 2**20
    assert engine.steps == 0 and node.tasks_running() == 0 and node.load()["active_requests"] == 0

  with_node(test)


def test_hidden_states_come_only_from_the_stage_before_shaped_and_within_the_context():
  first, second = Shard(MODEL.id, 0, 7, 16), Shard(MODEL.id, 8, 15, 16)
  ring = (("a", first), ("n", second))
  hidden = np.zeros((1, 3, 8), dtype=np.float32)  # the dummy engine's hidden size is 8

  async def test(node, engine, member):
    with pytest.raises(Refused, match="PERMISSION_DENIED: request r1's input to 'n' came from 'x'; only 'a', the stage before, sends it"):
      await member("x").send_tensor(second, hidden, context("o", ring=ring))
    previous = member("a")
    with pytest.raises(
      Refused, match=r"INVALID_ARGUMENT: request r1: layers 8-15 take hidden states \(1, P, width\) with P >= 1, got int64 \[1, 3\]"
    ):
      await previous.send_tensor(second, np.zeros((1, 3), dtype=np.int64), context("o", ring=ring))
    with pytest.raises(Refused, match="INVALID_ARGUMENT: request r1 would reach position 2049, beyond the planned context of 2048 tokens"):
      await previous.send_tensor(second, np.zeros((1, 2049, 8), dtype=np.float32), context("o", ring=ring))
    assert engine.steps == 0 and node.load()["active_requests"] == 0
    await previous.send_tensor(second, hidden, context("o", ring=ring))
    await asyncio.wait_for(engine.entered.wait(), STALL_S)

  with_node(test)


def test_requests_served_for_other_origins_count_in_the_load_and_the_limit():
  async def test(node, engine, member):
    origin = member("o")
    await origin.send_prompt(WHOLE, "first", context("o", "r1"))
    await asyncio.wait_for(engine.entered.wait(), STALL_S)
    assert node.load()["active_requests"] == 1
    with pytest.raises(Refused, match=r"RESOURCE_EXHAUSTED: node 'n' already runs 1 requests, its limit \(--max-requests\)"):
      await origin.send_prompt(WHOLE, "second", context("o", "r2"))
    assert engine.steps == 1  # only the first request's prompt ran
    with pytest.raises(Busy, match=r"already runs 1 requests, its limit \(--max-requests\)"):  # nor does it admit one of its own
      await node.admit("mine", MODEL)
    await origin.send_opaque_status("r1", FINISH)  # its origin ends it
    assert node.load()["active_requests"] == 0
    await origin.send_prompt(WHOLE, "second", context("o", "r3"))  # room again
    assert node.load()["active_requests"] == 1

  with_node(test, max_requests=1, gated=True)


def test_a_cancel_or_a_result_from_a_stranger_is_ignored_and_the_request_completes(caplog):
  async def test(node, engine, member):
    task = asyncio.create_task(node.generate("hello ring", max_tokens=8))
    await asyncio.wait_for(engine.entered.wait(), STALL_S)
    [request_id] = node.originated_request_ids()
    stranger = member("stranger")
    with caplog.at_level(logging.WARNING, logger="exo.orchestration"):
      await stranger.send_opaque_status(request_id, FINISH)
      await stranger.send_result(request_id, [7, 7, 7], True)
    assert request_id not in node.finished
    engine.gate.set()
    generation = await asyncio.wait_for(task, STALL_S)
    reference = DummyInferenceEngine(eos_after=10**9)
    assert generation.tokens == await greedy_tokens(reference, WHOLE, await reference.encode(WHOLE, "hello ring"), 8)
    # a request served for another origin: a stranger's cancel is ignored, its origin's is taken
    engine.gate.clear()
    await member("o").send_prompt(WHOLE, "served", context("o", "r9"))
    await stranger.send_opaque_status("r9", FINISH)
    assert "r9" not in node.finished and node.load()["active_requests"] == 1
    await member("o").send_opaque_status("r9", FINISH)
    assert "r9" in node.finished and node.load()["active_requests"] == 0

  with_node(test, gated=True)
  ignored = [r.getMessage() for r in caplog.records if r.name.startswith("exo.orchestration.") and r.getMessage().startswith("ignoring")]
  assert len(ignored) == 3 and all("from 'stranger'" in m for m in ignored), ignored
