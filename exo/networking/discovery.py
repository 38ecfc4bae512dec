"""How a node finds its peers: UDP broadcast or a manual peers file."""

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

from exo.base.device_capabilities import DeviceCapabilities
from exo.networking.liveness import Liveness, health_check_ms
from exo.networking.peer_handle import PeerHandle

CreatePeerHandle = Callable[[str, str, DeviceCapabilities], PeerHandle]  # (peer id, address, capabilities) -> handle


def host_port(host: str, port: int) -> str:
  """`host:port`, with an IPv6 literal in brackets as gRPC expects."""
  return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Discovery(ABC):
  @abstractmethod
  async def start(self) -> None:
    pass

  @abstractmethod
  async def stop(self) -> None:
    pass

  @abstractmethod
  async def discover_peers(self, wait_for_peers: int = 0) -> list[PeerHandle]:
    """The live peers now (healthy, not evicted), after waiting until at least `wait_for_peers` are known."""

  @abstractmethod
  def announce(self, capabilities: DeviceCapabilities) -> None:
    """Announce `capabilities` as this node's from now on (they change as the node measures its engine); a discovery that
    announces nothing ignores them."""

  def rtt_ms(self, peer_id: str) -> float | None:
    """The measured round trip to `peer_id` in ms; None if not measured (a discovery that does not time its health checks)."""
    return None

  def silent_peers(self) -> list[str]:
    """Peers heard of (announced, or in the peers file) that are not listed now: what a node waiting for peers still lacks."""
    return []

  async def check_now(self, peer_ids: Iterable[str]) -> set[str]:
    """Health-check `peer_ids` now, after a request failed on them; returns those that did not answer healthy (or are not
    peers), which `discover_peers` leaves out until they answer healthy again where the discovery keeps that memory."""
    peers, ids = {p.id(): p for p in await self.discover_peers()}, set(peer_ids)
    checked = [i for i in ids if i in peers]
    samples = await asyncio.gather(*(health_check_ms(peers[i], timeout=1.0) for i in checked))
    return ids - {i for i, sample in zip(checked, samples) if sample is not None}


class CheckedDiscovery(Discovery):
  """A discovery whose peers' health and RTT a `Liveness` keeps: the node reads both from here rather than checking again."""

  liveness: Liveness
  poll_s: float  # how often discover_peers looks again while it waits for peers

  async def discover_peers(self, wait_for_peers: int = 0) -> list[PeerHandle]:
    """The listed peers (healthy lately, not suspects) sorted by id, once at least `wait_for_peers` are listed."""
    return await self.liveness.wait_for(wait_for_peers, self.poll_s)

  def rtt_ms(self, peer_id: str) -> float | None:
    return self.liveness.rtt_ms(peer_id)

  def silent_peers(self) -> list[str]:
    return sorted(set(self.liveness.peers) - {p.id() for p in self.liveness.listed()})

  async def check_now(self, peer_ids: Iterable[str]) -> set[str]:
    return await self.liveness.suspect_unless_healthy(peer_ids)


class NoDiscovery(Discovery):
  """A node on its own: no announcements, no peers (`exo run` without --wait-for-peers answers locally)."""

  async def start(self) -> None:
    pass

  async def stop(self) -> None:
    pass

  async def discover_peers(self, wait_for_peers: int = 0) -> list[PeerHandle]:
    return []

  def announce(self, capabilities: DeviceCapabilities) -> None:
    pass
