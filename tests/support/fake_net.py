"""Fake peer handles for the discovery tests (manual and UDP), and waiting on what discovery does with them: a test waits until a
condition holds, checked again each time a fake reports something (a handle made, a health check answered, a disconnect, a log
record it is told to hear), never on a fixed sleep."""

import asyncio
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops
from tests.support.health_only_peer import HealthOnlyPeer
from tests.support.patience import STALL_S

WAIT_S = STALL_S  # the conditions the tests wait for normally hold within a fraction of a second
STUDIO = DeviceCapabilities("Mac Studio", "Apple M2 Ultra", 196608.0, DeviceFlops(27.2, 54.4, 108.8), 800.0)
AIR = DeviceCapabilities("MacBook Air", "Apple M2", 16384.0, DeviceFlops(3.6, 7.1, 14.2), 100.0)


class FakePeer(HealthOnlyPeer):
  def __init__(self, net: "FakeNet", peer_id: str, address: str, caps: DeviceCapabilities):
    self.net, self._id, self.address, self.caps = net, peer_id, address, caps
    self.checks = self.disconnects = 0

  def id(self):
    return self._id

  def addr(self):
    return self.address

  def device_capabilities(self):
    return self.caps

  async def disconnect(self):
    self.disconnects += 1
    self.net.changed()

  async def health_check(self, timeout=2.0):
    self.checks += 1
    self.net.changed()
    return self.net.healthy.get(self.address, self.net.healthy.get(self._id, True))


class _Hearing(logging.Handler):
  def __init__(self, net: "FakeNet"):
    super().__init__(logging.DEBUG)
    self.net = net

  def emit(self, record: logging.LogRecord) -> None:
    self.net.changed()


class FakeNet:
  """The create_peer_handle factory; `healthy[peer id or address]` (default True) is what health checks answer. `until` waits
  for a condition on what discovery did with the handles."""

  def __init__(self):
    self.healthy: dict[str, bool] = {}
    self.handles: list[FakePeer] = []
    self._waiters: set[asyncio.Future] = set()

  def __call__(self, peer_id: str, address: str, caps: DeviceCapabilities) -> FakePeer:
    handle = FakePeer(self, peer_id, address, caps)
    self.handles.append(handle)
    self.changed()
    return handle

  def made(self, peer_id: str) -> list[FakePeer]:
    return [h for h in self.handles if h.id() == peer_id]

  def changed(self) -> None:
    """Something happened: the waiters check their conditions again."""
    for waiter in self._waiters:
      if not waiter.done():
        waiter.set_result(None)

  @contextmanager
  def hearing(self, logger: str) -> Iterator[None]:
    """Within the block, each record `logger` logs (at any level) also wakes the waiters."""
    handler, target = _Hearing(self), logging.getLogger(logger)
    target.addHandler(handler)
    try:
      yield
    finally:
      target.removeHandler(handler)

  async def until(self, condition, what: str) -> None:
    """Until `condition()` (a bool, or an awaitable of one) holds, checked now and after each change; fails after WAIT_S."""

    async def holds() -> None:
      while True:
        changed = asyncio.get_running_loop().create_future()
        self._waiters.add(changed)  # before the check: a change while an awaitable condition runs is not missed
        try:
          if await result if inspect.isawaitable(result := condition()) else result:
            return
          await changed
        finally:
          self._waiters.discard(changed)

    try:
      await asyncio.wait_for(holds(), WAIT_S)
    except asyncio.TimeoutError:
      raise AssertionError(f"timed out waiting until {what}") from None


async def ids(discovery) -> list[str]:
  return [p.id() for p in await discovery.discover_peers()]


async def ids_are(discovery, expected: list[str]) -> bool:
  return await ids(discovery) == expected


async def has_addr(discovery, addr: str) -> bool:
  return addr in [p.addr() for p in await discovery.discover_peers()]


async def addrs_are(discovery, expected: list[str]) -> bool:
  return [p.addr() for p in await discovery.discover_peers()] == expected
