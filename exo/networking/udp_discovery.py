"""Discovery by UDP broadcast on the LAN, upstream exo's protocol with the capabilities the planner needs.

Every `broadcast_interval` a node sends to each broadcast address, on `broadcast_port`, the JSON announcement

  {"type": "discovery", "node_id": ..., "grpc_port": ..., "device_capabilities": {..., "memory_bandwidth": ...}, "priority": 1}

(plus "advertised_host" when the node is reachable at an address other than the one it sends from, e.g. behind NAT), sealed
with the cluster's secret: a "timestamp" and an "hmac" over the rest (exo.networking.membership). A node ignores an announcement
that its cluster's secret did not seal (logging it, once a minute at most per sender's address), one stamped more than
ANNOUNCEMENT_MAX_AGE_S away from its own clock, and one not newer than the last it took from the same node (a replayed copy).
Each announcement carries the capabilities the node last gave `announce`: its measured layer times change as it refines them,
and a peer re-announcing at its address with only new layer times keeps its handle and connection (the handle keeps the
capabilities first announced: nodes take each peer's current ones from the peer itself, when they collect the topology).
A peer is listed from its first successful health check until it has not answered one for `discovery_timeout`; a
healthy peer whose announcements are lost is kept, and announcements alone never keep an unhealthy one.

Loopback (found on Linux, and what the tests rely on): a socket bound to 127.0.0.1 does not receive broadcasts; a
datagram sent to 127.255.255.255 with SO_BROADCAST is delivered to sockets bound to 0.0.0.0 or to 127.255.255.255,
and with SO_REUSEPORT to every one of them, while a unicast datagram to 127.0.0.1 reaches only one of the sockets
sharing the port. So several nodes on one machine find each other by broadcast, and tests bind
listen_host="127.255.255.255", which hears loopback broadcasts and nothing from the LAN.
"""

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import socket
import time
from dataclasses import dataclass, replace

import psutil

from exo.base.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities
from exo.networking.discovery import CheckedDiscovery, CreatePeerHandle, host_port
from exo.networking.liveness import Liveness, disconnect
from exo.networking.membership import ANNOUNCEMENT_MAX_AGE_S, Membership, NotAMember, RateLimitedLog, cluster_membership

log = logging.getLogger(__name__)

PRIORITY = 1  # upstream's field: of two addresses for one peer, a working one is only replaced by a higher priority


@dataclass(frozen=True)
class Announcement:
  node_id: str
  grpc_port: int
  device_capabilities: DeviceCapabilities
  priority: int = PRIORITY
  advertised_host: str | None = None


def parse_announcement(data: bytes | dict) -> Announcement:
  """The announcement in one datagram (or its parsed JSON); ValueError (BadInput for bad capabilities) if it is not one."""
  if isinstance(data, dict):
    msg = data
  else:
    try:
      msg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: a packet of 5000 '['
      raise ValueError(f"not JSON: {e}") from None
  if not isinstance(msg, dict) or msg.get("type") != "discovery":
    raise ValueError(f'expected a JSON object with "type": "discovery", got {str(msg)[:80]!r}')
  node_id, port, prio, host = msg.get("node_id"), msg.get("grpc_port"), msg.get("priority", PRIORITY), msg.get("advertised_host")
  if not isinstance(node_id, str) or not node_id:
    raise ValueError(f"node_id must be a non-empty string, got {node_id!r}")
  if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
    raise ValueError(f"grpc_port must be an integer from 1 to 65535, got {port!r}")
  if isinstance(prio, bool) or not isinstance(prio, int):
    raise ValueError(f"priority must be an integer, got {prio!r}")
  if host is not None and (not isinstance(host, str) or not host):
    raise ValueError(f"advertised_host must be a non-empty string, got {host!r}")
  caps = msg.get("device_capabilities")
  caps = UNKNOWN_DEVICE_CAPABILITIES if caps is None else DeviceCapabilities.from_dict(caps, "device_capabilities")
  return Announcement(node_id, port, caps, prio, host)


def default_broadcast_addresses() -> list[str]:
  """The IPv4 broadcast address of every interface that has one, so announcements reach each LAN this machine is on."""
  out = set()
  for addrs in psutil.net_if_addrs().values():
    for a in addrs:
      if a.family != socket.AF_INET:
        continue
      if a.broadcast:
        out.add(a.broadcast)
      elif a.netmask and not a.ptp and not ipaddress.IPv4Address(a.address).is_loopback:  # some platforms leave it out
        net = ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False)
        if net.prefixlen < 31:
          out.add(str(net.broadcast_address))
  return sorted(out)


def listen_socket(host: str, port: int) -> socket.socket:
  """A UDP socket bound to host:port that other nodes on this machine can bind too (SO_REUSEADDR, SO_REUSEPORT)."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
      with contextlib.suppress(OSError):  # defined but unsupported on some kernels
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
  except OSError:
    sock.close()
    raise
  return sock


@dataclass(eq=False)
class _Announced:
  addr: str
  caps: DeviceCapabilities
  priority: int
  last_seen: float  # time.monotonic() of the last announcement


class _Listener(asyncio.DatagramProtocol):
  def __init__(self, on_datagram):
    self.on_datagram = on_datagram

  def datagram_received(self, data: bytes, addr) -> None:
    self.on_datagram(data, addr)

  def error_received(self, exc: Exception) -> None:
    log.debug("discovery listener error: %s", exc)


def _device(caps: DeviceCapabilities) -> DeviceCapabilities:
  """The device without what changes as a node runs (its measured layer times, the model files it holds and receives): what
  identifies a node's announcements."""
  return replace(caps, layer_times={}, holdings={}, transfers=())


class UDPDiscovery(CheckedDiscovery):
  def __init__(
    self,
    node_id: str,
    node_port: int,
    listen_port: int,
    broadcast_port: int,
    create_peer_handle: CreatePeerHandle,
    device_capabilities: DeviceCapabilities,
    broadcast_interval: float = 2.5,
    discovery_timeout: float = 30,
    broadcast_addresses: list[str] | None = None,
    advertised_host: str | None = None,
    listen_host: str = "0.0.0.0",
    health_check_timeout: float = 2.0,
    membership: Membership | None = None,
  ):
    """`membership`: the cluster whose announcements it seals and takes (default: this machine's, `cluster_membership()`)."""
    self.node_id, self.node_port, self.listen_port, self.broadcast_port = node_id, node_port, listen_port, broadcast_port
    self.create_peer_handle, self.device_capabilities = create_peer_handle, device_capabilities
    self.broadcast_interval, self.discovery_timeout, self.poll_s = broadcast_interval, discovery_timeout, min(0.1, broadcast_interval)
    self.liveness = Liveness(health_check_timeout, discovery_timeout)
    self.broadcast_addresses = None if broadcast_addresses is None else list(broadcast_addresses)
    self.advertised_host, self.listen_host = advertised_host, listen_host
    self._announced: dict[str, _Announced] = {}  # by peer id: where the handle Liveness checks was made from
    self._transport: asyncio.DatagramTransport | None = None
    self._sender: socket.socket | None = None
    self._send_errors: set[str] = set()  # logged once each
    self.membership = membership or cluster_membership()
    self._stamps: dict[str, float] = {}  # by peer id: the timestamp of the last announcement taken from it
    self._refused = RateLimitedLog(log)
    self._tasks: set[asyncio.Task] = set()

  def announcement(self) -> dict:
    msg = {
      "type": "discovery",
      "node_id": self.node_id,
      "grpc_port": self.node_port,
      "device_capabilities": self.device_capabilities.to_dict(),
      "priority": PRIORITY,
    }
    if self.advertised_host:
      msg["advertised_host"] = self.advertised_host
    return msg

  async def start(self) -> None:
    if self.broadcast_addresses is None:
      self.broadcast_addresses = default_broadcast_addresses()
      if not self.broadcast_addresses:
        log.warning("no IPv4 interface has a broadcast address: this node will not announce itself")
    log.info(
      "discovery: listening on %s:%d, announcing to %s port %d", self.listen_host, self.listen_port, self.broadcast_addresses, self.broadcast_port
    )
    loop = asyncio.get_running_loop()
    self._transport, _ = await loop.create_datagram_endpoint(
      lambda: _Listener(self._on_datagram), sock=listen_socket(self.listen_host, self.listen_port)
    )
    self._sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    self._sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    self._sender.setblocking(False)
    self._spawn(self._broadcast_forever())
    self._spawn(self._check_forever())

  async def stop(self) -> None:
    tasks, self._tasks = list(self._tasks), set()
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if self._transport is not None:
      self._transport.close()
      self._transport = None
    if self._sender is not None:
      self._sender.close()
      self._sender = None
    self._announced = {}
    await self.liveness.forget_all()

  def _spawn(self, coro) -> None:
    task = asyncio.create_task(coro)
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  def announce(self, capabilities: DeviceCapabilities) -> None:
    self.device_capabilities = capabilities

  async def _broadcast_forever(self) -> None:
    while True:
      data = self.membership.seal(self.announcement())
      for address in self.broadcast_addresses:
        try:
          self._sender.sendto(data, (address, self.broadcast_port))
        except OSError as e:  # an interface gone down, a full buffer: try again next interval
          if f"{address}: {e}" not in self._send_errors:
            log.warning("cannot announce to %s:%d: %s", address, self.broadcast_port, e)
          self._send_errors.add(f"{address}: {e}")
      await asyncio.sleep(self.broadcast_interval)

  def _on_datagram(self, data: bytes, addr) -> None:
    try:
      message = self.membership.open(data)
      ann = parse_announcement(message)
    except NotAMember as e:
      self._refused.warning(
        addr[0], "ignoring discovery announcements from %s: %s (a node of another cluster, or one started without this cluster's secret)", addr[0], e
      )
      return
    except ValueError as e:
      log.debug("ignoring a malformed discovery packet from %s: %s", addr[0], e)
      return
    if ann.node_id == self.node_id or not self._fresh(ann.node_id, message["timestamp"], addr[0]):
      return
    try:
      self._seen(ann.node_id, host_port(ann.advertised_host or addr[0], ann.grpc_port), ann.device_capabilities, ann.priority)
    except Exception:  # a bug, e.g. in create_peer_handle: log it and keep listening
      log.exception("handling the announcement of %s failed", ann.node_id)

  def _fresh(self, peer_id: str, stamp: float, source: str) -> bool:
    """Whether an announcement of `peer_id` stamped `stamp` is one to take: within ANNOUNCEMENT_MAX_AGE_S of this node's clock,
    and newer than the last taken from that node (a copy of one replayed later is not)."""
    skew = time.time() - stamp
    if abs(skew) > ANNOUNCEMENT_MAX_AGE_S:
      self._refused.warning(
        source,
        "ignoring an announcement of node %r from %s stamped %.0f s %s this node's clock: a replayed copy, or the two clocks differ by more than %g s",
        peer_id,
        source,
        abs(skew),
        "behind" if skew > 0 else "ahead of",
        ANNOUNCEMENT_MAX_AGE_S,
      )
      return False
    if stamp <= self._stamps.get(peer_id, -math.inf):
      log.debug("ignoring an announcement of node %r from %s: not newer than the last one taken", peer_id, source)
      return False
    self._stamps[peer_id] = stamp
    return True

  def _seen(self, peer_id: str, addr: str, caps: DeviceCapabilities, priority: int) -> None:
    now = time.monotonic()
    peer, state = self._announced.get(peer_id), self.liveness.peers.get(peer_id)
    if peer is not None and state is not None and peer.addr == addr and _device(peer.caps) == _device(caps):
      peer.caps = caps  # its measured layer times moved: the same node, handle and connection
    if peer is not None and state is not None and (peer.addr, peer.caps) != (addr, caps):
      if state.known and state.healthy and _device(peer.caps) == _device(caps) and priority <= peer.priority:
        peer.last_seen = now  # the same node on another interface: keep the address that works rather than flap
        return
      log.info("peer %s moved from %s to %s", peer_id, peer.addr, addr)
      self._spawn(disconnect(self.liveness.forget(peer_id, f"it moved to {addr}")))
      state = None
    if state is None:
      state = self.liveness.track(peer_id, self.create_peer_handle(peer_id, addr, caps))
      peer = self._announced[peer_id] = _Announced(addr, caps, priority, now)
    peer.last_seen = now
    if not state.known and not state.checking:
      self._spawn(self.liveness.check([peer_id]))  # the first check, at once rather than at the next round

  async def _check_forever(self) -> None:
    while True:
      try:
        await self._check_round()
      except Exception:
        log.exception("discovery health checks failed")
      await asyncio.sleep(self.broadcast_interval)

  async def _check_round(self) -> None:
    """Health-check every known peer (evicting those without a healthy answer for discovery_timeout), and forget the unknown
    ones not announced for discovery_timeout."""
    await self.liveness.check([i for i, s in self.liveness.peers.items() if s.known])
    now = time.monotonic()
    for peer_id, state in list(self.liveness.peers.items()):
      if not state.known and not state.checking and now - self._announced[peer_id].last_seen > self.discovery_timeout:
        await disconnect(self.liveness.forget(peer_id, "no longer announced"))
    for peer_id in set(self._announced) - set(self.liveness.peers):
      del self._announced[peer_id]
    oldest = time.time() - ANNOUNCEMENT_MAX_AGE_S  # an announcement stamped before this is refused anyway
    self._stamps = {peer_id: stamp for peer_id, stamp in self._stamps.items() if stamp >= oldest}
