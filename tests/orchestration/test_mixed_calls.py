"""The stage scheduler where the engine mixes prompt rows and decode steps of different requests in one call (prompt_rows > 0),
and a shard's batch lowered to the requests whose KV cache fits beside it in memory."""

import asyncio

import pytest

from exo.inference.inference_engine import Step
from tests.support.clock import FakeClock, settle
from tests.support.scheduler_engine import FIRST, LAST, Engine, decode_until, hidden, scheduler_on, tokens


@pytest.fixture
def clock() -> FakeClock:
  return FakeClock()


def test_where_the_engine_mixes_calls_short_prompts_share_calls_shortest_first_and_decode_steps_ride_along(clock):
  """prompt_rows 10: prompts of 3, 4, 5 and 6 positions (waiting together) run in two calls, the shortest first, each call
  within 10 prompt rows; the decode steps waiting run in the first of them, beside the prompts."""

  async def main():
    engine = Engine()
    scheduler = scheduler_on(clock, engine, max_batch=4, prompt_rows=10)
    engine.gate.clear()
    blocker = asyncio.create_task(scheduler.run(FIRST, Step("r9", tokens(1), 40)))
    await settle()  # r9's decode step is in the engine: everything below waits together
    prompts = [asyncio.create_task(scheduler.run(FIRST, Step(f"r{n}", tokens(n), 0))) for n in (6, 4, 5, 3)]
    decodes = [asyncio.create_task(scheduler.run(FIRST, Step(f"r{i}", tokens(1), 50 + i))) for i in (1, 2)]
    await settle()
    engine.gate.set()
    outs = await asyncio.gather(blocker, *prompts, *decodes)
    calls = [sorted(call) for _, call, _ in engine.calls[1:]]
    assert calls == [sorted([("r1", 51, 1), ("r2", 52, 1), ("r3", 0, 3), ("r4", 0, 4)]), sorted([("r5", 0, 5)]), sorted([("r6", 0, 6)])]
    assert [chunk for _, _, chunk in engine.calls] == [False, True, True, True]
    assert [out.shape[1] for out in outs[1:5]] == [6, 4, 5, 3]  # every prompt's positions back, on the first shard
    assert scheduler.decode_steps == 3  # r9 alone, then r1 and r2 beside the prompts
    await scheduler.stop()

  clock.run(main())


def test_a_prompt_longer_than_prompt_rows_runs_in_chunks_of_prompt_rows_with_decode_steps_beside_each(clock):
  async def main():
    engine = Engine()
    scheduler = scheduler_on(clock, engine, max_batch=4, prompt_rows=8)
    done = asyncio.Event()
    decoding = asyncio.create_task(decode_until(scheduler, done, clock))
    await settle()
    out = await scheduler.run(LAST, Step("r2", hidden(20), 0))
    done.set()
    await decoding
    chunks = [call for _, call, chunk in engine.calls if chunk]
    assert [[(r, p, n) for r, p, n in call if r == "r2"] for call in chunks] == [[("r2", 0, 8)], [("r2", 8, 8)], [("r2", 16, 4)]]
    assert all(any(r == "r1" for r, _, _ in call) for call in chunks)  # the decoding request ran in every one of them
    assert out.tolist() == [[[19, 2]]]
    await scheduler.stop()

  clock.run(main())


def test_a_shards_batch_is_lowered_to_the_requests_whose_kv_cache_fits_in_memory(clock):
  """batch_limit says 3 requests fit beside LAST (at the steps' context) and nothing about FIRST: LAST's decode calls hold at
  most 3 of the 5 waiting steps, FIRST's all 5; a limit of 0 still runs one at a time."""

  async def main():
    engine = Engine()
    limits = {LAST: 3, FIRST: None}
    scheduler = scheduler_on(clock, engine, max_batch=8, batch_limit=lambda shard, context: limits[shard] if context == 512 else 0)
    engine.gate.clear()
    for shard in (LAST, FIRST):
      blocker = asyncio.create_task(scheduler.run(shard, Step("r0", hidden(1) if shard == LAST else tokens(1), 9, 512)))
      await settle()
      steps = [scheduler.run(shard, Step(f"r{i}", hidden(1) if shard == LAST else tokens(1), 9, 512)) for i in range(1, 6)]
      waiting = [asyncio.create_task(step) for step in steps]
      await settle()
      engine.gate.set()
      await asyncio.gather(blocker, *waiting)
      engine.gate.clear()
    assert [len(call) for _, call, _ in engine.calls] == [1, 3, 2, 1, 5]
    assert scheduler.largest_batch() == 8
    tight = scheduler_on(clock, Engine(), max_batch=8, batch_limit=lambda shard, context: 0)
    await tight.run(LAST, Step("r0", hidden(1), 0, 512))
    assert tight.largest_batch() == 1
    await scheduler.stop()
    await tight.stop()

  clock.run(main())
