"""A scripted engine for the stage scheduler's tests, the steps they send, and a scheduler on a FakeClock."""

import asyncio

import numpy as np

from exo.base.shard import Shard
from exo.inference.inference_engine import Step
from exo.orchestration.stage_scheduler import StageScheduler
from tests.support.clock import FakeClock

FIRST = Shard("m", 0, 3, 8)  # token ids in, hidden states out
LAST = Shard("m", 4, 7, 8)  # hidden states in, logits out
HIDDEN = 2


class Engine:
  """Records each call as (shard, [(request, position, rows)], chunk). Output row r of a step at position p is [p + r, request
  number]: a caller can tell which positions and request it got. Calls wait for `gate` while it is clear."""

  def __init__(self):
    self.calls: list[tuple[Shard, list[tuple[str, int, int]], bool]] = []
    self.gate = asyncio.Event()
    self.gate.set()
    self.fail: set[str] = set()

  async def __call__(self, shard: Shard, steps: list[Step], chunk: bool) -> list:
    self.calls.append((shard, [(s.request_id, s.position, rows(s)) for s in steps], chunk))
    await self.gate.wait()
    return [ValueError(f"{s.request_id} broke") if s.request_id in self.fail else output(s) for s in steps]


def rows(step: Step) -> int:
  return step.input_data.shape[0] if step.input_data.ndim == 1 else step.input_data.shape[-2]


def output(step: Step) -> np.ndarray:
  n = rows(step)
  return np.stack([np.arange(step.position, step.position + n), np.full(n, int(step.request_id[1:]))], axis=-1)[None].astype(np.float32)


def tokens(n: int) -> np.ndarray:
  return np.arange(n, dtype=np.int64)


def hidden(n: int) -> np.ndarray:
  return np.zeros((1, n, HIDDEN), dtype=np.float32)


def scheduler_on(clock: FakeClock, run_call, cancelled=lambda _: False, **options) -> StageScheduler:
  return StageScheduler(run_call, cancelled, clock=clock, sleep=clock.sleep, **options)


async def decode_until(
  scheduler: StageScheduler, done: asyncio.Event, clock: FakeClock, away_s: float = 0.0, came_back: asyncio.Event | None = None
) -> None:
  """Request r1 decoding at the last shard until `done`, its next step coming back `away_s` after each (0: at once, as on a
  one-node ring); `came_back` is set once its second step has run (the stage has seen how long it was away)."""
  position = 0
  while not done.is_set():
    await scheduler.run(LAST, Step("r1", hidden(1), position))
    position += 1
    if position == 2 and came_back is not None:
      came_back.set()
    if away_s:
      await clock.sleep(away_s)
