"""ShardedEngine's rules, on the dummy engine (which uses them unchanged): a step out of place is refused, never restarted; two
shards serve their own requests side by side; a shard that does not fit waits for the requests holding memory, and says so."""

import asyncio

import numpy as np
import pytest

from exo.base.shard import Shard
from exo.inference.dummy_inference_engine import CONTEXT_LENGTH, DummyInferenceEngine
from exo.inference.inference_engine import Step
from exo.inference.sharded_engine import RequestStateError
from tests.support.greedy import greedy_tokens

WHOLE, FIRST, SECOND = Shard("m", 0, 7, 8), Shard("m", 0, 3, 8), Shard("m", 4, 7, 8)
PROMPT = np.array([40, 41, 42, 43])


def test_a_step_for_an_unknown_request_is_refused():
  engine = DummyInferenceEngine()
  with pytest.raises(RequestStateError, match="unknown at layers 0-7 .* position 4"):
    asyncio.run(engine.infer_tensor("lost", WHOLE, np.array([50]), 4))
  assert engine.active_requests() == set()


def test_a_step_at_the_wrong_position_is_refused():
  async def run():
    engine = DummyInferenceEngine()
    await engine.infer_tensor("r", WHOLE, PROMPT, 0)
    for position in (0, 3, 5):  # repeated prompt, a step already taken, a step skipped
      with pytest.raises(RequestStateError, match=f"at position 4 .* position {position}"):
        await engine.infer_tensor("r", WHOLE, np.array([50]), position)
    await engine.infer_tensor("r", WHOLE, np.array([50]), 4)  # the right step still runs

  asyncio.run(run())


def test_a_request_reaches_at_most_the_context_its_first_step_names():
  """The first step's context (the plan's) bounds the request's positions from then on; 0 means the model's."""

  async def run():
    engine = DummyInferenceEngine()
    await engine.infer_batch(WHOLE, [Step("short", PROMPT, 0, 6), Step("whole", PROMPT, 0)])
    assert [engine._states[(r, WHOLE)].context for r in ("short", "whole")] == [6, CONTEXT_LENGTH]
    for position in (4, 5):
      await engine.infer_tensor("short", WHOLE, np.array([50]), position)  # later steps name no context: the first one's holds
    with pytest.raises(ValueError, match="reach 7 positions; expected at most its context .*, 6"):
      await engine.infer_tensor("short", WHOLE, np.array([50]), 6)
    [out] = await engine.infer_batch(WHOLE, [Step("big", PROMPT, 0, CONTEXT_LENGTH + 1)])  # never beyond the model's
    assert isinstance(out, np.ndarray) and engine._states[("big", WHOLE)].context == CONTEXT_LENGTH

  asyncio.run(run())


def test_a_request_known_under_another_shard_is_refused():
  async def run():
    engine = DummyInferenceEngine()
    await engine.infer_tensor("r", FIRST, PROMPT, 0)
    with pytest.raises(RequestStateError, match="runs on layers 0-3 of this node, not on 0-7"):
      await engine.infer_tensor("r", WHOLE, PROMPT, 0)

  asyncio.run(run())


def test_two_shards_serve_interleaved_requests_as_alone():
  async def run():
    engine = DummyInferenceEngine(eos_after=1000)
    expected = await greedy_tokens(DummyInferenceEngine(eos_after=1000), WHOLE, PROMPT, 6)
    ring = DummyInferenceEngine(eos_after=1000)  # stands for the other node of the two-stage ring
    x_whole, x_split, pos, tokens = PROMPT, PROMPT, 0, {"whole": [], "split": []}
    for _ in range(6):
      tokens["whole"].append(await engine.sample(await engine.infer_tensor("whole", WHOLE, x_whole, pos)))
      hidden = await engine.infer_tensor("split", FIRST, x_split, pos)
      tokens["split"].append(await ring.sample(await ring.infer_tensor("split", SECOND, hidden, pos)))
      assert set(engine.resident_shards()) == {WHOLE, FIRST}
      pos += len(x_whole)
      x_whole, x_split = np.array(tokens["whole"][-1:]), np.array(tokens["split"][-1:])
    return expected, tokens

  expected, tokens = asyncio.run(run())
  assert tokens == {"whole": expected, "split": expected}


class Sized(DummyInferenceEngine):
  """A dummy whose shards take 10 bytes a layer, under a memory limit."""

  def _shard_bytes(self, shard: Shard) -> int:
    return 10 * shard.get_layer_count()


def test_a_shard_that_does_not_fit_waits_for_the_requests_holding_memory():
  async def run():
    engine = Sized(eos_after=1000, memory_limit_bytes=100)  # 8 layers (80 bytes) fit; 8 + 4 do not
    await engine.infer_tensor("old", WHOLE, PROMPT, 0)
    second = asyncio.create_task(engine.infer_tensor("new", FIRST, PROMPT, 0))
    while engine.waiting is None:
      await asyncio.sleep(0)
    assert "0-3 wait for the requests on layers 0-7" in engine.waiting and not second.done()
    await engine.infer_tensor("old", WHOLE, np.array([50]), 4)  # the running request goes on meanwhile
    await engine.finish_request("old")
    await second
    return engine

  engine = asyncio.run(run())
  assert engine.resident_shards() == [FIRST] and engine.waiting is None


def test_an_idle_shard_is_dropped_when_another_is_loaded():
  async def run():
    engine = DummyInferenceEngine()
    await greedy_tokens(engine, WHOLE, PROMPT, 3)
    await engine.infer_tensor("next", FIRST, PROMPT, 0)
    return engine.resident_shards()

  assert asyncio.run(run()) == [FIRST]
