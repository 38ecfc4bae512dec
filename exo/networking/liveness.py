"""Which peers answer, and how fast: the one place that health-checks peers.

A discovery decides which peers exist (the entries of a peers file, the nodes that announce themselves) and hands their
handles to a `Liveness`, which health-checks them: one timed check per peer per round, all peers concurrently. A peer is
listed from its first healthy answer until its last healthy answer is older than `evict_after` seconds (then it is
dropped and disconnected). Each healthy answer's round trip is a sample of the peer's RTT. A peer that a request failed
on, and that then failed a health check, is a suspect: listed no more until it answers healthy again, while its handle
is kept until it is evicted. One check per peer per round, whatever uses the figures: the node takes the RTT and
suspects from here rather than checking again.
"""

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from exo.networking.peer_handle import PeerHandle
from exo.networking.rtt import RttEstimator

log = logging.getLogger(__name__)


async def health_check_ms(handle: PeerHandle, timeout: float) -> float | None:
  """The round trip of one `handle.health_check` in ms, or None if it did not answer healthy (an exception, a broken
  PeerHandle, counts as unhealthy rather than ending discovery)."""
  started = time.perf_counter()
  try:
    healthy = bool(await handle.health_check(timeout))
  except Exception:
    log.exception("health check of %s raised; counting it as unhealthy", handle.addr())
    return None
  return (time.perf_counter() - started) * 1000.0 if healthy else None


async def disconnect(handle: PeerHandle) -> None:
  try:
    await handle.disconnect()
  except Exception as e:
    log.debug("disconnecting %s failed: %s", handle.addr(), e)


@dataclass(eq=False)
class PeerState:
  handle: PeerHandle
  known: bool = False  # answered healthy since this handle was made
  healthy: bool = False  # the last check's answer
  last_ok: float = 0.0  # time.monotonic() of the last healthy answer
  suspect: bool = False  # failed a request, then a check; not listed until it answers healthy again
  checking: bool = False  # a check is in flight
  rtt: RttEstimator = field(default_factory=RttEstimator)


class Liveness:
  def __init__(self, check_timeout: float, evict_after: float):
    self.check_timeout, self.evict_after = check_timeout, evict_after
    self.peers: dict[str, PeerState] = {}

  def track(self, peer_id: str, handle: PeerHandle) -> PeerState:
    """Start checking `handle` as `peer_id` (a handle it replaces must be `forget`-ed first)."""
    state = self.peers[peer_id] = PeerState(handle)
    return state

  def forget(self, peer_id: str, why: str) -> PeerHandle:
    """Stop checking `peer_id`; returns its handle, for the caller to `disconnect`."""
    state = self.peers.pop(peer_id)
    if state.known:
      log.info("dropping peer %s at %s: %s", peer_id, state.handle.addr(), why)
    return state.handle

  async def forget_all(self) -> None:
    states, self.peers = list(self.peers.values()), {}
    await asyncio.gather(*(disconnect(s.handle) for s in states))

  async def check(self, peer_ids: Iterable[str] | None = None) -> set[str]:
    """One concurrent round of health checks of `peer_ids` (default: every tracked peer); returns those that did not answer
    healthy (an id not tracked counts as not answering). Evicts the known peers silent for `evict_after`. O(peers) RPCs."""
    ids = list(self.peers) if peer_ids is None else list(dict.fromkeys(peer_ids))
    checked = [(i, self.peers[i]) for i in ids if i in self.peers]
    for _, state in checked:
      state.checking = True
    try:
      samples = await asyncio.gather(*(health_check_ms(s.handle, self.check_timeout) for _, s in checked))
    finally:
      for _, state in checked:
        state.checking = False
    now, failed = time.monotonic(), {i for i in ids if i not in self.peers}
    for (peer_id, state), sample in zip(checked, samples):
      if self.peers.get(peer_id) is not state:
        continue  # replaced or dropped while the check ran
      state.healthy = sample is not None
      if sample is not None:
        if not state.known:
          log.info("found peer %s at %s", peer_id, state.handle.addr())
        state.known, state.last_ok, state.suspect = True, now, False
        state.rtt.add(sample)
        continue
      failed.add(peer_id)
      if state.known and now - state.last_ok > self.evict_after:
        await disconnect(self.forget(peer_id, f"no healthy answer for {self.evict_after:g} s"))
    return failed

  async def suspect_unless_healthy(self, peer_ids: Iterable[str]) -> set[str]:
    """Check `peer_ids` now (a request failed on them); those that do not answer healthy become suspects. Returns them."""
    failed = await self.check(peer_ids)
    for peer_id in failed & set(self.peers):
      self.peers[peer_id].suspect = True
    return failed

  def listed(self) -> list[PeerHandle]:
    """The handles of the known peers that are not suspects, sorted by id."""
    return [s.handle for _, s in sorted(self.peers.items()) if s.known and not s.suspect]

  async def wait_for(self, n: int, poll_s: float) -> list[PeerHandle]:
    """`listed()`, once at least `n` peers are listed (polling every `poll_s` seconds)."""
    while len(listed := self.listed()) < n:
      await asyncio.sleep(poll_s)
    return listed

  def rtt_ms(self, peer_id: str) -> float | None:
    state = self.peers.get(peer_id)
    return None if state is None else state.rtt.value()
