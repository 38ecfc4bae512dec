"""The planned context at run time (docs/DESIGN.md v2.1): the origin refuses a request whose prompt and max_tokens exceed it
and caps an answer that names no max_tokens at what it leaves; the plan's context travels with the request, so every stage of
the ring makes each request's KV cache for it (dummy engines, real nodes and gRPC on loopback)."""

import asyncio
import json

import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.errors import BadInput
from exo.base.models import model_spec
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.networking.discovery import NoDiscovery
from exo.networking.grpc.grpc_peer_handle import peer_handles
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual_discovery import ManualDiscovery
from exo.networking.ports import free_port
from exo.orchestration.admission import answer_budget
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.plan_request import PlanRequest
from tests.support.planned_context import largest_context

MODEL = model_spec("smollm2-135m")
PROMPT = "What is the capital of France?"  # 30 tokens on the dummy engine: a byte each
SMALL = {"a": 160.0, "b": 160.0}  # MB: together they hold SmolLM2, with KV for less than its 8192 tokens
DEVICES = {n: DeviceCapabilities("Test", n, mb, DeviceFlops(1.0, 2.0, 4.0), 20.0) for n, mb in SMALL.items()}


@pytest.mark.parametrize(
  "prompt, requested, context, most, expected",
  [
    (40, None, 3072, 8192, 3032),  # no max_tokens: what the context leaves after the prompt
    (40, None, 3072, 1024, 1024),  # ... at most --max-generate-tokens
    (40, 3032, 3072, 8192, 3032),  # max_tokens that exactly fill the context
    (40, 500, 3072, 256, 256),  # max_tokens that fit, cut to --max-generate-tokens
    (3071, None, 3072, 8192, 1),  # room for one token
  ],
)
def test_the_answer_budget(prompt, requested, context, most, expected):
  assert answer_budget(prompt, requested, context, most) == expected


@pytest.mark.parametrize(
  "prompt, requested, context, message",
  [
    (
      40,
      5000,
      3072,
      "the prompt is 40 tokens and max_tokens is 5000: 5040 tokens, beyond the planned context of 3072 tokens; ask for at most 3032",
    ),
    (40, 3033, 3072, "the prompt is 40 tokens and max_tokens is 3033: 3073 tokens, beyond the planned context of 3072 tokens"),
    (3072, None, 3072, "the prompt is 3072 tokens, beyond the planned context of 3072 tokens (the answer included): a prompt may have at most 3071"),
    (3072, 1, 3072, "the prompt is 3072 tokens, beyond the planned context of 3072 tokens"),
  ],
)
def test_a_request_beyond_the_context_is_bad_input_naming_both_numbers(prompt, requested, context, message):
  with pytest.raises(BadInput) as error:
    answer_budget(prompt, requested, context, 8192)
  assert str(error.value).startswith(message) and error.value.http_status == 400


def test_an_answer_without_max_tokens_fills_the_planned_context_and_one_beyond_it_is_refused():
  async def main():
    node = Node(
      "solo", DummyInferenceEngine(eos_after=10**9), NoDiscovery(), DEVICES["a"], MODEL, PlannerConfig(PlanRequest.of(max_context=64)), 10**6
    )
    node.server = GRPCServer(node, "127.0.0.1", 0)
    await node.start()
    try:
      generation = await node.generate(PROMPT)
      assert generation.plan.context_tokens == 64 and len(generation.tokens) == 64 - len(PROMPT)
      assert len((await node.generate(PROMPT, max_tokens=64 - len(PROMPT))).tokens) == 64 - len(PROMPT)
      with pytest.raises(BadInput, match=f"max_tokens is {65 - len(PROMPT)}: 65 tokens, beyond the planned context of 64 tokens"):
        await node.generate(PROMPT, max_tokens=65 - len(PROMPT))
      assert node.engine.active_requests() == set()
    finally:
      await node.stop()

  asyncio.run(main())


class ContextSpy(EngineWrapper):
  """Records, for every step it runs, the context the step named and the one the engine made the request's state for."""

  def __init__(self, inner, node_id: str, seen: list):
    super().__init__(inner)
    self.node_id, self.seen = node_id, seen

  async def infer_batch(self, shard, steps):
    outputs = await self.inner.infer_batch(shard, steps)
    self.seen.extend((self.node_id, s.context, self.inner._states[(s.request_id, shard)].context) for s in steps)
    return outputs


def test_every_stage_keeps_kv_for_the_context_the_origin_planned(tmp_path):
  """Two 160 MB nodes cannot hold SmolLM2's 8192 tokens of KV: the origin plans less, as worked out by hand, and both stages
  of the ring make each request's cache for that context, the second learning it from the gRPC message."""
  expected = largest_context(MODEL, list(SMALL.values()))
  assert 512 <= expected < 8192
  ports = {n: free_port() for n in SMALL}
  peers = {"peers": {n: {"address": "127.0.0.1", "port": ports[n], "device_capabilities": DEVICES[n].to_dict()} for n in SMALL}}
  (tmp_path / "peers.json").write_text(json.dumps(peers))
  seen: list = []
  nodes = []
  for name in SMALL:
    discovery = ManualDiscovery(name, tmp_path / "peers.json", peer_handles(name), poll_interval=0.1)
    engine = ContextSpy(DummyInferenceEngine(eos_after=10**9), name, seen)
    node = Node(name, engine, discovery, DEVICES[name], MODEL, max_generate_tokens=4, request_timeout=60)
    node.server = GRPCServer(node, "127.0.0.1", ports[name])
    nodes.append(node)

  async def main():
    await asyncio.gather(*(n.start(wait_for_peers=1) for n in nodes))
    try:
      return await nodes[0].generate(PROMPT)
    finally:
      for node in nodes:
        await node.stop()

  generation = asyncio.run(main())
  plan = generation.plan
  assert plan.context_tokens == expected and [n for n, _ in plan.ring()] in (["a", "b"], ["b", "a"])
  assert any(f"with a context of 8192 tokens: planned for {expected} tokens" in w for w in plan.warnings)
  assert len(generation.tokens) == 4
  assert {n for n, _, _ in seen} == {"a", "b"} and set((c, made) for _, c, made in seen) == {(expected, expected)}
