"""A clock that a test moves: for code whose decisions are about time (how long a step waits for company, how long a request
is away), so that those decisions come out the same on an idle machine and on a loaded one.

Time stands still while any task can run. `FakeClock.run(coroutine)` runs a test's coroutine; whenever every task waits, it
moves the time to the earliest deadline a task sleeps until (`FakeClock.sleep`) and wakes the tasks due then. Nothing here
reads the real time, so the order of events is the same on every run."""

import asyncio
import heapq
import itertools
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

YIELDS = 100  # loop turns that let every woken task run until it waits again (the chains of wake-ups here are a few turns long)


async def settle() -> None:
  """Let every task that can run do so until it waits again."""
  for _ in range(YIELDS):
    await asyncio.sleep(0)


class FakeClock:
  """Call it for the time (seconds, starting at `start`, as time.monotonic counts from an arbitrary point); `sleep` for as
  long as the test runs its coroutine and the time reaches the deadline."""

  def __init__(self, start: float = 1000.0):
    self.now = start
    self._sleepers: list[tuple[float, int, asyncio.Future]] = []  # (deadline, order of arrival, woken when due)
    self._order = itertools.count()

  def __call__(self) -> float:
    return self.now

  async def sleep(self, seconds: float) -> None:
    if seconds <= 0:
      await asyncio.sleep(0)
      return
    woken = asyncio.get_running_loop().create_future()
    heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), woken))
    await woken

  async def run(self, coroutine: Coroutine[Any, Any, T], limit_s: float = 3600.0) -> T:
    """Run `coroutine` to its end (its result, or its exception), moving the time whenever every task waits. Fails if every
    task waits and none sleeps (nothing would ever wake them), or once the time is `limit_s` past where it stood."""
    task = asyncio.ensure_future(coroutine)
    limit = self.now + limit_s
    try:
      while True:
        await settle()
        if task.done():
          return task.result()
        while self._sleepers and self._sleepers[0][2].done():  # a sleep cancelled: nobody waits for its deadline
          heapq.heappop(self._sleepers)
        if not self._sleepers:
          raise AssertionError(f"every task waits and none sleeps: the test would hang at {self.now:g} s")
        self.now = max(self.now, self._sleepers[0][0])
        if self.now > limit:
          raise AssertionError(f"the test ran {limit_s:g} s of the clock without finishing")
        while self._sleepers and self._sleepers[0][0] <= self.now:
          _, _, woken = heapq.heappop(self._sleepers)
          if not woken.done():
            woken.set_result(None)
    finally:
      if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
