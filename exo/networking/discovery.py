"""How a node finds its peers: UDP broadcast or a manual peers file."""

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from exo.networking.peer_handle import PeerHandle
from exo.topology.device_capabilities import DeviceCapabilities

log = logging.getLogger(__name__)

CreatePeerHandle = Callable[[str, str, DeviceCapabilities], PeerHandle]  # (peer id, address, capabilities) -> handle


def host_port(host: str, port: int) -> str:
  """`host:port`, with an IPv6 literal in brackets as gRPC expects."""
  return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def health_check(handle: PeerHandle, timeout: float) -> bool:
  """`handle.health_check`, with an exception (a broken PeerHandle) counted as unhealthy rather than ending discovery."""
  try:
    return bool(await handle.health_check(timeout))
  except Exception:
    log.exception("health check of %s raised; counting it as unhealthy", handle.addr())
    return False


async def disconnect(handle: PeerHandle) -> None:
  try:
    await handle.disconnect()
  except Exception as e:
    log.debug("disconnecting %s failed: %s", handle.addr(), e)


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


async def known_peers(entries: dict, wait_for_peers: int, poll_s: float) -> list[PeerHandle]:
  """The handles of `entries` (id -> record with .known and .handle) that are known, sorted by id, after waiting (polling every
  `poll_s` seconds) until at least `wait_for_peers` are."""
  while sum(e.known for e in entries.values()) < wait_for_peers:
    await asyncio.sleep(poll_s)
  return [e.handle for _, e in sorted(entries.items()) if e.known]


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
