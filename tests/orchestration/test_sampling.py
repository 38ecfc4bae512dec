"""Sampling and stop strings at a node (dummy engine, the node alone is the ring): a seed fixes a request's tokens whatever else
runs, temperature 0 is the greedy answer, each request's generator is dropped when it ends, and a stop string ends the
request on the ring and cuts its text."""

import asyncio

import pytest

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.base.errors import BadInput
from exo.base.models import model_spec
from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.engine_wrapper import EngineWrapper
from exo.inference.sampling import Sampling
from exo.networking.discovery import NoDiscovery
from exo.orchestration.node import Node
from exo.orchestration.planner_driver import PlannerConfig
from exo.topology.plan_request import PlanRequest
from tests.support.greedy import greedy_tokens
from tests.support.no_server import NoServer

MODEL = model_spec("llama-3.2-1b")
DEVICE = DeviceCapabilities("Test Box", "Test Chip", 16384.0, DeviceFlops(10.0, 20.0, 40.0), 200.0)
PROMPT = "Tell me something."
TOKENS = 30


class Batches(EngineWrapper):
  """Records the size of every engine call."""

  def __init__(self, inner):
    super().__init__(inner)
    self.sizes: list[int] = []

  async def infer_batch(self, shard, steps):
    self.sizes.append(len(steps))
    return await self.inner.infer_batch(shard, steps)


async def started_node(engine=None, batch: int = 1) -> Node:
  node = Node(
    "solo",
    engine or DummyInferenceEngine(eos_after=10**9),
    NoDiscovery(),
    DEVICE,
    MODEL,
    PlannerConfig(PlanRequest.of(batch=batch)),
    request_timeout=60,
  )
  node.server = NoServer()
  await node.start()
  return node


def generate(**kwargs):
  """The generation of PROMPT on a fresh node (a model that never ends by itself: each answer is TOKENS tokens)."""

  async def main():
    node = await started_node()
    try:
      return await node.generate(PROMPT, max_tokens=TOKENS, **kwargs)
    finally:
      await node.stop()

  return asyncio.run(main())


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
  first = generate(sampling=Sampling(0.8, seed=1))
  assert len(first.tokens) == TOKENS and first.finish_reason == "length"
  assert generate(sampling=Sampling(0.8, seed=1)).tokens == first.tokens
  assert generate(sampling=Sampling(0.8, seed=2)).tokens != first.tokens
  assert generate(sampling=Sampling(0.8)).tokens != generate(sampling=Sampling(0.8)).tokens  # no seed: fresh each time


def test_temperature_0_is_the_greedy_answer():
  async def reference():
    engine, shard = DummyInferenceEngine(eos_after=10**9), Shard(MODEL.id, 0, MODEL.n_layers - 1, MODEL.n_layers)
    return await greedy_tokens(engine, shard, await engine.encode(shard, PROMPT), TOKENS)

  greedy = generate().tokens
  assert greedy == asyncio.run(reference())
  assert generate(sampling=Sampling(0.0, top_p=0.5, top_k=3, seed=4)).tokens == greedy
  assert generate(sampling=Sampling(0.8, seed=1)).tokens != greedy


def test_concurrent_seeded_requests_each_get_what_they_get_alone():
  seeds = [1, 2, 3, 1]
  alone = [generate(sampling=Sampling(0.9, top_p=0.9, seed=s)).tokens for s in seeds]

  async def main():
    node = await started_node(Batches(DummyInferenceEngine(eos_after=10**9)), batch=4)
    try:
      together = await asyncio.gather(*(node.generate(PROMPT, max_tokens=TOKENS, sampling=Sampling(0.9, top_p=0.9, seed=s)) for s in seeds))
      return [g.tokens for g in together], node.stages.sampling_ids(), max(node.engine.sizes)
    finally:
      await node.stop()

  together, generators_left, largest_batch = asyncio.run(main())
  assert largest_batch > 1  # their steps did run together
  assert together == alone and together[0] == together[3] and together[0] != together[1]
  assert generators_left == set()  # each request's generator went with it


def test_a_stop_string_ends_the_request_and_cuts_its_text():
  text = generate().text
  stop = text[12:15]
  cut = text[: text.index(stop)]

  async def main():
    node = await started_node()
    try:
      generation = await node.generate(PROMPT, max_tokens=TOKENS, stop=("never there", stop))
      return generation, generation.request_id in node.finished, node.stages.sampling_ids()
    finally:
      await node.stop()

  generation, finished, ring_tokens = asyncio.run(main())
  assert (generation.text, generation.finish_reason) == (cut, "stop")
  assert len(generation.tokens) < TOKENS and finished and ring_tokens == set()  # the ring was told, and stopped before the budget
  unmatched = generate(stop=("never there",))
  assert (unmatched.text, unmatched.finish_reason) == (text, "length")


def test_an_empty_stop_string_is_refused():
  with pytest.raises(BadInput, match="stop string"):
    generate(stop=("",))
