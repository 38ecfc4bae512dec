"""A clock that a test moves: for code whose decisions are about time (how long a step waits for company, how long a request
is away), so that those decisions come out the same on an idle machine and on a loaded one.

`FakeClock.run(coroutine)` runs a test's coroutine on an event loop that reads this clock: time stands still while any task
can run, and once every task waits, the clock jumps to the earliest timer (a `sleep`, a timeout) and the loop runs what is due
then. Nothing reads the real time, so the order of events is the same on every run."""

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def settle() -> None:
  """Let every task that can run do so for a while (for tests that step through a scenario by hand)."""
  for _ in range(20):
    await asyncio.sleep(0)


class _JumpingSelector(selectors.DefaultSelector):
  """The loop's selector: where the loop would block until its next timer, the clock jumps there instead."""

  def __init__(self, clock: "FakeClock"):
    super().__init__()
    self.clock = clock

  def select(self, timeout: float | None = None):
    events = super().select(0)
    if events or timeout == 0:
      return events
    if timeout is None:
      raise AssertionError(f"every task waits, and on nothing the clock brings: the test would hang at {self.clock.now:g} s")
    self.clock.now += timeout
    return events


class _ClockLoop(asyncio.SelectorEventLoop):
  def __init__(self, clock: "FakeClock"):
    self.clock = clock
    super().__init__(_JumpingSelector(clock))

  def time(self) -> float:
    return self.clock.now


class FakeClock:
  """Call it for the time (seconds, starting at `start`, as time.monotonic counts from an arbitrary point); `sleep` waits that
  long on it. Both hold inside `run` only."""

  def __init__(self, start: float = 1000.0):
    self.now = start

  def __call__(self) -> float:
    return self.now

  async def sleep(self, seconds: float) -> None:
    await asyncio.sleep(seconds)  # the loop `run` made keeps its timers on this clock

  def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end on a loop whose time is this clock, as asyncio.run does; its result, or its exception."""
    with asyncio.Runner(loop_factory=lambda: _ClockLoop(self)) as runner:
      return runner.run(coroutine)
