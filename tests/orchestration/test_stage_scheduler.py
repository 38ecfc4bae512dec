"""The stage scheduler against a scripted engine: which steps run together, in what order, and what each caller gets back.
Every scheduler here reads a FakeClock: an engine call of 30 ms takes 30 ms of that clock, however busy the machine is."""

import asyncio

import pytest

from exo.inference.inference_engine import Step
from exo.orchestration.stage_scheduler import StepCancelled
from tests.support.clock import FakeClock, settle
from tests.support.patience import STALL_S
from tests.support.scheduler_engine import FIRST, LAST, Engine, decode_until, hidden, output, scheduler_on, tokens


@pytest.fixture
def clock() -> FakeClock:
  return FakeClock()


def test_decode_steps_that_wait_together_run_as_one_call_of_at_most_max_batch(clock):
  async def main():
    engine = Engine()
    scheduler = scheduler_on(clock, engine, max_batch=4)
    engine.gate.clear()
    first = asyncio.create_task(scheduler.run(LAST, Step("r0", hidden(1), 10)))
    await settle()  # r0 runs alone: nothing else was waiting
    rest = [asyncio.create_task(scheduler.run(LAST, Step(f"r{i}", hidden(1), 20 + i))) for i in range(1, 6)]
    await settle()
    engine.gate.set()
    outs = await asyncio.gather(first, *rest)
    assert [[r for r, _, _ in call] for _, call, _ in engine.calls] == [["r0"], ["r1", "r2", "r3", "r4"], ["r5"]]
    assert [out.tolist() for out in outs] == [[[[10, 0]]], *[[[[20 + i, i]]] for i in range(1, 6)]]
    assert scheduler.batch_sizes == [1, 4, 1] and (scheduler.decode_calls, scheduler.decode_steps) == (3, 6)
    await scheduler.stop()

  clock.run(main())


def test_decode_steps_of_different_shards_never_share_a_call(clock):
  async def main():
    engine = Engine()
    scheduler = scheduler_on(clock, engine, max_batch=8)
    engine.gate.clear()
    first = [asyncio.create_task(scheduler.run(shard, Step(f"r{i}", x, 0))) for i, (shard, x) in enumerate([(FIRST, tokens(1)), (LAST, hidden(1))])]
    await settle()  # one call running on each shard
    steps = [(FIRST, tokens(1)), (LAST, hidden(1)), (FIRST, tokens(1)), (LAST, hidden(1))]
    rest = [asyncio.create_task(scheduler.run(shard, Step(f"r{i + 2}", x, 0))) for i, (shard, x) in enumerate(steps)]
    await settle()
    engine.gate.set()
    await asyncio.gather(*first, *rest)
    calls = sorted((shard.start_layer, [r for r, _, _ in call]) for shard, call, _ in engine.calls)
    assert calls == [(0, ["r0"]), (0, ["r2", "r4"]), (4, ["r1"]), (4, ["r3", "r5"])]
    await scheduler.stop()

  clock.run(main())


def test_a_call_waiting_inside_the_engine_does_not_hold_up_another_shard(clock):
  """A second layer range waiting for memory until the requests on the first finish: those requests still run."""

  async def main():
    memory = asyncio.Event()

    async def run_call(shard, steps, chunk):
      if shard == LAST:
        await memory.wait()  # LAST cannot load until the request on FIRST is over
      return [output(s) for s in steps]

    scheduler = scheduler_on(clock, run_call)
    waiting = asyncio.create_task(scheduler.run(LAST, Step("r1", hidden(1), 0)))
    await settle()
    for position in range(5):
      await asyncio.wait_for(scheduler.run(FIRST, Step("r2", tokens(1), position)), STALL_S)
    memory.set()
    await asyncio.wait_for(waiting, STALL_S)
    await scheduler.stop()

  clock.run(main())


def test_a_prompt_runs_in_chunks_at_consecutive_positions_and_the_caller_gets_every_position_back(clock):
  async def main():
    engine = Engine()
    scheduler = scheduler_on(clock, engine, chunk_tokens=4)
    out = await scheduler.run(FIRST, Step("r1", tokens(10)[None], 0))
    assert [call for _, call, _ in engine.calls] == [[("r1", 0, 4)], [("r1", 4, 4)], [("r1", 8, 2)]]
    assert all(chunk for _, _, chunk in engine.calls)
    assert out[0, :, 0].tolist() == list(range(10))
    await scheduler.stop()

  clock.run(main())


def test_on_the_last_shard_a_prompt_gives_only_its_last_position(clock):
  async def main():
    engine = Engine()
    scheduler = scheduler_on(clock, engine, chunk_tokens=4)
    out = await scheduler.run(LAST, Step("r1", hidden(10), 3))
    assert [call for _, call, _ in engine.calls] == [[("r1", 3, 4)], [("r1", 7, 4)], [("r1", 11, 2)]]
    assert out.tolist() == [[[12, 1]]]
    await scheduler.stop()

  clock.run(main())


def test_while_a_request_decodes_a_long_prompt_gets_at_most_its_share_of_the_stage(clock):
  """A long prompt (8 chunks of 30 ms) while a request decodes whose next step comes back at once, as on a one-node ring, so
  that between its steps no decode waits. With prompt_share 0.25 a chunk starts only once the decode calls have had three
  times the last chunk's time; decoding goes on between chunks, and the prompt is read in full."""

  async def main():
    calls = []  # (start, end, is a chunk)

    async def run_call(shard, steps, chunk):
      start = clock()
      await clock.sleep(0.03 if chunk else 0.005)
      calls.append((start, clock(), chunk))
      return [output(s) for s in steps]

    scheduler = scheduler_on(clock, run_call, max_batch=2, chunk_tokens=2, prompt_share=0.25)
    prompt_read = asyncio.Event()

    decoder = asyncio.create_task(decode_until(scheduler, prompt_read, clock))
    await scheduler.run(LAST, Step("r1", hidden(1), 10**6))  # r1 decodes here before the prompt arrives
    out = await scheduler.run(LAST, Step("r0", hidden(16), 0))
    prompt_read.set()
    await decoder
    await scheduler.stop()
    return calls, out

  calls, out = clock.run(main())
  chunks = [(start, end) for start, end, chunk in calls if chunk]
  assert len(chunks) == 8 and out.shape == (1, 1, 2)
  for (start, end), (next_start, _) in zip(chunks, chunks[1:]):
    assert next_start >= end + 3 * (end - start), (start, end, next_start)
    assert any(not chunk and end <= s < next_start for s, _, chunk in calls)


def test_a_prompt_of_one_chunk_is_not_held_back_by_the_time_share_of_a_long_one(clock):
  """While a request decodes and a long prompt is read (chunks of 30 ms, each holding the next chunk of a long prompt back at
  least 0.27 s), a question whose prompt fits in one chunk is read after a few decode calls, well within that time."""

  async def main():
    chunks = []  # (request, start, end)
    first_chunk_done = asyncio.Event()

    async def run_call(shard, steps, chunk):
      start = clock()
      await clock.sleep(0.03 if chunk else 0.005)
      if chunk:
        chunks.append((steps[0].request_id, start, clock()))
        first_chunk_done.set()
      return [output(s) for s in steps]

    scheduler = scheduler_on(clock, run_call, chunk_tokens=2, prompt_share=0.1)
    prompt_read = asyncio.Event()

    decoder = asyncio.create_task(decode_until(scheduler, prompt_read, clock))
    await scheduler.run(LAST, Step("r1", hidden(1), 10**6))  # r1 decodes here before the prompts arrive
    long = asyncio.create_task(scheduler.run(LAST, Step("r0", hidden(16), 0)))
    await first_chunk_done.wait()
    await scheduler.run(LAST, Step("r2", hidden(2), 0))
    await long
    prompt_read.set()
    await decoder
    await scheduler.stop()
    return chunks

  (first, _, first_end), (second, second_start, _), *_ = clock.run(main())
  assert (first, second) == ("r0", "r2") and second_start < first_end + 0.27


def test_a_chunk_runs_while_the_decoders_are_away_round_the_ring(clock):
  """A decoding request whose next step comes back 0.2 s after each (from the ring's other stages) and a long prompt in chunks
  of 20 ms, with a time share that alone would hold each chunk back 0.18 s: a chunk that ends before the decoder is back delays
  nobody, so chunks run back to back in those gaps."""

  async def main():
    chunks = []  # (start, end)

    async def run_call(shard, steps, chunk):
      start = clock()
      await clock.sleep(0.02 if chunk else 0.005)
      if chunk:
        chunks.append((start, clock()))
      return [output(s) for s in steps]

    scheduler = scheduler_on(clock, run_call, chunk_tokens=2, prompt_share=0.1)
    prompt_read, came_back = asyncio.Event(), asyncio.Event()

    decoder = asyncio.create_task(decode_until(scheduler, prompt_read, clock, away_s=0.2, came_back=came_back))
    await came_back.wait()  # r1 has gone round once: the stage knows how long it is away
    await scheduler.run(LAST, Step("r0", hidden(16), 0))
    prompt_read.set()
    await decoder
    await scheduler.stop()
    return chunks

  chunks = clock.run(main())
  assert len(chunks) == 8
  assert any(next_start < end + 9 * (end - start) for (start, end), (next_start, _) in zip(chunks, chunks[1:])), chunks


def test_the_prompt_with_fewest_positions_left_goes_first(clock):
  async def main():
    engine = Engine()
    scheduler = scheduler_on(clock, engine, chunk_tokens=4)
    engine.gate.clear()
    long = asyncio.create_task(scheduler.run(FIRST, Step("r1", tokens(40), 0)))
    await settle()
    short = asyncio.create_task(scheduler.run(FIRST, Step("r2", tokens(6), 0)))
    await settle()
    engine.gate.set()
    await asyncio.gather(long, short)
    order = [call[0][0] for _, call, _ in engine.calls]
    assert order[:4] == ["r1", "r2", "r2", "r1"], order  # the short prompt's two chunks overtake the long one's nine left
    await scheduler.stop()

  clock.run(main())


def test_a_cancelled_request_loses_its_waiting_steps_and_cannot_start_new_ones(clock):
  async def main():
    engine = Engine()
    over: set[str] = set()
    scheduler = scheduler_on(clock, engine, over.__contains__, chunk_tokens=4)
    engine.gate.clear()
    prompt = asyncio.create_task(scheduler.run(FIRST, Step("r1", tokens(40), 0)))
    await settle()
    waiting = asyncio.create_task(scheduler.run(FIRST, Step("r2", tokens(1), 7)))
    await settle()
    over.update({"r1", "r2"})
    scheduler.cancel("r2")
    scheduler.cancel("r1")
    engine.gate.set()
    for task in (prompt, waiting):
      with pytest.raises(StepCancelled):
        await task
    assert [call[0][0] for _, call, _ in engine.calls] == ["r1"]  # the chunk already running, and nothing after it
    with pytest.raises(StepCancelled):
      await scheduler.run(FIRST, Step("r1", tokens(1), 4))
    assert scheduler.waiting_requests() == 0
    await scheduler.stop()

  clock.run(main())


def test_a_step_the_engine_fails_fails_alone(clock):
  async def main():
    engine = Engine()
    engine.fail.add("r2")
    scheduler = scheduler_on(clock, engine, max_batch=4)
    engine.gate.clear()
    blocker = asyncio.create_task(scheduler.run(LAST, Step("r0", hidden(1), 0)))
    await settle()
    tasks = [asyncio.create_task(scheduler.run(LAST, Step(f"r{i}", hidden(1), 1))) for i in (1, 2, 3)]
    await settle()
    engine.gate.set()
    results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["ndarray", "ndarray", "ValueError", "ndarray"]
    await scheduler.stop()

  clock.run(main())


def test_a_decode_call_waits_briefly_for_the_other_requests_decoding_here(clock):
  """Two requests decode here; their next steps arrive a moment apart (their tokens travel the ring separately). The first
  waits up to half a decode call for the second, and both run as one call."""

  async def main():
    calls = []

    async def run_call(shard, steps, chunk):
      calls.append(sorted(s.request_id for s in steps))
      await clock.sleep(0.2)  # a decode call: 0.2 s, so a step waits up to 0.1 s for company
      return [output(s) for s in steps]

    scheduler = scheduler_on(clock, run_call, max_batch=4)
    await asyncio.gather(*(scheduler.run(LAST, Step(r, hidden(1), 0)) for r in ("r1", "r2")))  # both decoding here

    async def later(request: str, delay: float):
      await clock.sleep(delay)
      await scheduler.run(LAST, Step(request, hidden(1), 1))

    await asyncio.gather(later("r1", 0), later("r2", 0.02))
    assert calls[-1] == ["r1", "r2"], calls
    scheduler.cancel("r2")  # a request over no longer counts: r1 alone runs at once
    await scheduler.run(LAST, Step("r1", hidden(1), 2))
    assert calls[-1] == ["r1"]
    await scheduler.stop()

  clock.run(main())


@pytest.mark.parametrize("requests, batch, calls_per_round", [(8, 4, 2), (5, 4, 2), (12, 4, 3), (8, 16, 2), (3, 16, 2)])
def test_the_first_stage_regroups_decoding_requests_into_the_fewest_calls_per_round(requests, batch, calls_per_round, clock):
  """A two-stage ring in one scheduler (first stage, then last, then round again), requests joining a few milliseconds apart,
  so their first steps come in fragments. Once every request decodes, each round of the ring runs them in
  max(ceil(requests / batch), 2) calls at the first stage (two micro-batches keep both stages busy; a batch of 16 would
  leave one idle), whatever the fragments were (they merge within a round of joining); each call of either stage costs the
  same."""

  async def main():
    first_calls: list[list[str]] = []

    async def run_call(shard, steps, chunk):
      if shard == FIRST:
        first_calls.append([s.request_id for s in steps])
      await clock.sleep(0.02)
      return [output(s) for s in steps]

    scheduler = scheduler_on(clock, run_call, max_batch=batch)

    async def request(i: int):
      await clock.sleep(0.007 * i)
      for position in range(16):
        await scheduler.run(FIRST, Step(f"r{i}", tokens(1), position), stages=2)
        await scheduler.run(LAST, Step(f"r{i}", hidden(1), position), stages=2)

    await asyncio.gather(*(request(i) for i in range(requests)))
    await scheduler.stop()
    return first_calls

  calls = clock.run(main())
  everyone = {f"r{i}" for i in range(requests)}
  joined = next(n for n in range(len(calls)) if set().union(*calls[: n + 1]) == everyone)  # the last request's first call
  leaving = min(n for n in range(len(calls)) if set().union(*calls[n:]) != everyone)  # from here on, some request is done
  steady = calls[joined + 2 * calls_per_round : leaving]  # after the round in which the fragments merge
  assert len(steady) >= 3 * calls_per_round, calls
  for n in range(len(steady) - calls_per_round + 1):  # any calls_per_round calls in a row run every request once
    assert sorted(r for call in steady[n : n + calls_per_round] for r in call) == sorted(everyone), (n, steady)
