"""Many requests at one node (dummy engine, the node alone is the ring): batched steps give each request the tokens it gets
alone, a cancelled request stops using the engine at once, a short request is not held up by a long prompt, and a failure
that cannot reach the origin directly reaches it through a peer."""

import asyncio
import json
from collections.abc import Callable

import numpy as np
import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.errors import Busy
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.networking.discovery import NoDiscovery
from exo.networking.request_context import RequestContext, RingPlan
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.orchestration.requests import RequestFailed
from exo.topology.plan_request import PlanRequest
from tests.support.health_only_peer import HealthOnlyPeer
from tests.support.no_server import NoServer
from tests.support.patience import STALL_S

MODEL = model_spec("llama-3.2-1b")
DEVICE = DeviceCapabilities("Test Box", "Test Chip", 16384.0, DeviceFlops(10.0, 20.0, 40.0), 200.0)
PROMPTS = [f"prompt number {i}: " + "x" * (3 * i) for i in range(8)]


class CallRecorder(EngineWrapper):
  """Records every engine call: the request ids of its steps and their positions."""

  def __init__(self, inner):
    super().__init__(inner)
    self.calls: list[list[tuple[str, int]]] = []
    self.watches: list[tuple[Callable[[], bool], asyncio.Future]] = []

  async def infer_batch(self, shard, steps):
    self.calls.append([(s.request_id, s.position) for s in steps])
    self.check_watches()
    return await self.inner.infer_batch(shard, steps)

  def reached(self, condition: Callable[[], bool]) -> asyncio.Future:
    """Done once `condition()` holds: checked now, and at each engine call as it starts."""
    future = asyncio.get_running_loop().create_future()
    self.watches.append((condition, future))
    self.check_watches()
    return future

  def check_watches(self) -> None:
    for condition, future in list(self.watches):
      if not future.done() and condition():
        future.set_result(None)
    self.watches = [(c, f) for c, f in self.watches if not f.done()]

  def steps_of(self, request_id: str) -> int:
    return sum(r == request_id for call in self.calls for r, _ in call)


def lone_node(engine, batch: int = 1, node_id: str = "solo", **kwargs) -> Node:
  node = Node(node_id, engine, NoDiscovery(), DEVICE, MODEL, PlannerConfig(PlanRequest.of(batch=batch)), request_timeout=60, **kwargs)
  node.server = NoServer()
  return node


async def alone(prompt: str, max_tokens: int) -> list[int]:
  node = lone_node(DummyInferenceEngine())
  await node.start()
  try:
    return (await node.generate(prompt, max_tokens=max_tokens)).tokens
  finally:
    await node.stop()


def test_eight_concurrent_requests_batched_get_exactly_the_tokens_each_gets_alone():
  async def main():
    engine = CallRecorder(DummyInferenceEngine())
    node = lone_node(engine, batch=8)
    await node.start()
    try:
      together = await asyncio.gather(*(node.generate(p, max_tokens=30) for p in PROMPTS))
    finally:
      await node.stop()
    assert [g.tokens for g in together] == [await alone(p, 30) for p in PROMPTS]
    assert max(len(call) for call in engine.calls) > 1  # decode steps did run together
    assert all(len(call) <= 8 for call in engine.calls)

  asyncio.run(main())


def test_a_cancelled_request_stops_using_the_engine_at_once_while_the_others_finish():
  async def main():
    engine = CallRecorder(DummyInferenceEngine(eos_after=10**9))
    node = lone_node(engine, batch=4, max_generate_tokens=10**6)
    await node.start()
    try:
      started = asyncio.Event()
      endless = asyncio.create_task(node.generate("never ends", on_token=lambda tokens: len(tokens) >= 5 and started.set()))
      await asyncio.wait_for(started.wait(), STALL_S)
      [endless_id] = node.originated_request_ids()
      others = [asyncio.create_task(node.generate(p, max_tokens=40)) for p in PROMPTS[:3]]

      def others_ran() -> bool:  # every other request has run a step
        running = node.originated_request_ids()
        return len(running) == 1 + len(others) and all(engine.steps_of(i) for i in running)

      await asyncio.wait_for(engine.reached(others_ran), STALL_S)
      endless.cancel()
      with pytest.raises(asyncio.CancelledError):
        await endless
      at_cancel = engine.steps_of(endless_id)
      finished = await asyncio.gather(*others)
      assert engine.steps_of(endless_id) <= at_cancel + 1  # a step already running, and none after it
      assert all(len(g.tokens) == 40 for g in finished)
      assert endless_id not in node.stages.sampling_ids() and node.scheduler.waiting_requests() == 0
    finally:
      await node.stop()
    assert engine.inner.active_requests() == set()  # no engine state left behind

  asyncio.run(main())


def test_a_short_request_is_answered_while_a_long_prompt_is_still_being_read():
  async def main():
    engine = CallRecorder(DummyInferenceEngine())
    node = lone_node(engine, batch=4)
    node.scheduler.chunk_tokens = 16
    await node.start()
    try:
      long_first_token = asyncio.Event()
      long = asyncio.create_task(node.generate("L" * 4000, max_tokens=5, on_token=lambda _: long_first_token.set()))
      await asyncio.wait_for(engine.reached(lambda: bool(engine.calls)), STALL_S)
      short = await node.generate("short question", max_tokens=20)
      assert len(short.tokens) == 20 and not long_first_token.is_set()  # answered before the long prompt's first token
      assert (await long).tokens == await alone("L" * 4000, 5)
    finally:
      await node.stop()

  asyncio.run(main())


def test_a_node_at_its_request_limit_refuses_more_as_busy():
  async def main():
    node = lone_node(DummyInferenceEngine(eos_after=10**9), max_requests=2, max_generate_tokens=10**6)
    await node.start()
    try:
      first_tokens = [asyncio.Event() for _ in PROMPTS[:2]]
      running = [asyncio.create_task(node.generate(p, on_token=lambda _, e=e: e.set())) for p, e in zip(PROMPTS, first_tokens)]
      await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_tokens)), STALL_S)  # both run
      with pytest.raises(Busy, match=r"already runs 2 requests, its limit \(--max-requests\)"):
        await node.generate("one too many")
      for task in running:
        task.cancel()
      await asyncio.gather(*running, return_exceptions=True)
      assert len((await node.generate("room again", max_tokens=3)).tokens) == 3
    finally:
      await node.stop()

  asyncio.run(main())


def test_generation_stops_at_the_models_context():
  class SmallContext(EngineWrapper):
    async def context_length(self, shard):
      return 40

  async def main():
    node = lone_node(SmallContext(DummyInferenceEngine(eos_after=10**9)), max_generate_tokens=1000)
    await node.start()
    try:
      prompt = "twenty-five bytes long..."
      assert len((await node.generate(prompt)).tokens) == 40 - len(prompt.encode())
    finally:
      await node.stop()

  asyncio.run(main())


class Direct(HealthOnlyPeer):
  """A peer handle of node `sender` that calls another in-process node's methods as a server would (naming the sender);
  `reachable` False: every call fails as a lost link would."""

  def __init__(self, node: Node, sender: str, reachable: bool = True):
    self.node, self.sender, self.reachable = node, sender, reachable

  def id(self):
    return self.node.id

  def addr(self):
    return f"{self.node.id}:1"

  def device_capabilities(self):
    return DEVICE

  async def health_check(self, timeout=2.0):
    return self.reachable

  async def send_result(self, request_id, tokens, is_finished, error=""):
    if not self.reachable:
      raise ConnectionError("unreachable")
    self.node.process_result(request_id, tokens, is_finished, error, sender=self.sender)

  async def send_opaque_status(self, request_id, status):
    if not self.reachable:
      raise ConnectionError("unreachable")
    self.node.process_opaque_status(request_id, status, sender=self.sender)


def test_a_failure_the_failing_node_cannot_send_to_the_origin_reaches_it_through_a_peer():
  async def main():
    origin, stage, relay = (lone_node(DummyInferenceEngine(), node_id=node_id) for node_id in "osr")
    stage.peers = {"o": Direct(origin, "s", reachable=False), "r": Direct(relay, "s")}
    relay.peers = {"o": Direct(origin, "r")}
    ring = RingPlan.from_node_shards([("s", Shard(MODEL.id, 0, MODEL.n_layers - 1, MODEL.n_layers))])
    context = RequestContext("req", "o", ring, 10)
    failed = origin.origin.open("req", senders=frozenset({"s"})).future  # the ring: s alone (r passes on what s asked it to)
    wrong = Shard(MODEL.id, 0, 3, MODEL.n_layers)  # layers the plan does not give s: the stage fails
    await stage.stages.run(wrong, context, tensor=np.array([[5]], dtype=np.int64))
    with pytest.raises(RequestFailed, match="node 's' was sent layers 0-3"):
      await asyncio.wait_for(failed, STALL_S)

  asyncio.run(main())


def test_statuses_that_are_not_a_failure_to_pass_on_are_ignored():
  node = lone_node(DummyInferenceEngine())
  for status in ({"type": "failed"}, {"type": "failed", "origin": 3, "error": "x"}, {"type": "something else"}):
    node.process_opaque_status("req", json.dumps(status))
  assert node.tasks_running() == 0
