"""Discovery from a peers file the user writes, for networks where broadcast does not reach (VPNs, routed subnets).

The file, upstream exo's shape (`device_capabilities` optional; the node's own entry is skipped, so one file can
serve every node):

  {"peers": {"node2": {"address": "192.168.1.12", "port": 50052, "device_capabilities": {...}}}}

Every `poll_interval` the file is re-read and every configured peer health-checked concurrently. A peer is listed
from its first successful health check until its last one is older than `discovery_timeout` (then it is evicted and
disconnected) or it leaves the file.
"""

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from exo.errors import BadInput
from exo.networking.discovery import CreatePeerHandle, Discovery, disconnect, health_check, host_port, known_peers
from exo.networking.peer_handle import PeerHandle
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities, reject_unknown_keys

log = logging.getLogger(__name__)


def parse_peers(data, node_id: str) -> dict[str, tuple[str, DeviceCapabilities]]:
  """The peers in a parsed peers file other than `node_id`, as {peer_id: ("host:port", capabilities)}; BadInput if malformed."""
  if not isinstance(data, dict):
    raise BadInput(f'expected a JSON object {{"peers": {{...}}}}, got {type(data).__name__}')
  reject_unknown_keys(data, {"peers"}, "the top level")
  peers = data.get("peers")
  if not isinstance(peers, dict):
    raise BadInput(f"peers must be a JSON object mapping node ids to {{address, port}}, got {peers!r}")
  out = {}
  for peer_id, entry in peers.items():
    where = f"peers.{peer_id}"
    if not peer_id:
      raise BadInput("peers has an empty node id; expected a non-empty string")
    if not isinstance(entry, dict):
      raise BadInput(f"{where} must be a JSON object with address and port, got {entry!r}")
    reject_unknown_keys(entry, {"address", "port", "device_capabilities"}, where)
    address, port = entry.get("address"), entry.get("port")
    if not isinstance(address, str) or not address:
      raise BadInput(f"{where}.address must be a non-empty host name or IP address, got {address!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
      raise BadInput(f"{where}.port must be an integer from 1 to 65535, got {port!r}")
    caps = entry.get("device_capabilities")
    caps = UNKNOWN_DEVICE_CAPABILITIES if caps is None else DeviceCapabilities.from_dict(caps, f"{where}.device_capabilities")
    if peer_id != node_id:
      out[peer_id] = (host_port(address, port), caps)
  return out


def load_peers_file(path: str, node_id: str) -> dict[str, tuple[str, DeviceCapabilities]]:
  """`parse_peers` of the file at `path`; a one-line BadInput naming the file and the problem."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise BadInput(f"cannot read peers file {path}: {e.strerror or e}") from None
  except json.JSONDecodeError as e:
    raise BadInput(f"peers file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  except UnicodeDecodeError as e:
    raise BadInput(f"peers file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
  try:
    return parse_peers(data, node_id)
  except BadInput as e:
    raise BadInput(f"peers file {path}: {e}") from None


@dataclass(eq=False)
class _Peer:
  handle: PeerHandle
  addr: str
  caps: DeviceCapabilities
  known: bool = False  # answered a health check since this handle was made
  last_ok: float = 0.0  # time.monotonic() of the last successful health check


class ManualDiscovery(Discovery):
  def __init__(
    self,
    node_id: str,
    config_path: str,
    create_peer_handle: CreatePeerHandle,
    discovery_timeout: float = 30,
    poll_interval: float = 1.0,
    health_check_timeout: float = 2.0,
  ):
    self.node_id, self.config_path, self.create_peer_handle = node_id, config_path, create_peer_handle
    self.discovery_timeout, self.poll_interval, self.health_check_timeout = discovery_timeout, poll_interval, health_check_timeout
    self._config: dict[str, tuple[str, DeviceCapabilities]] = {}
    self._peers: dict[str, _Peer] = {}
    self._problem: str | None = None  # the peers file's current problem, so it is logged once rather than every poll
    self._task: asyncio.Task | None = None

  async def start(self) -> None:
    """Read the peers file (a BadInput if it is missing or malformed) and start polling."""
    self._config = load_peers_file(self.config_path, self.node_id)
    self._task = asyncio.create_task(self._poll_forever())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task
      self._task = None
    peers, self._peers = list(self._peers.values()), {}
    await asyncio.gather(*(disconnect(p.handle) for p in peers))

  async def discover_peers(self, wait_for_peers: int = 0) -> list[PeerHandle]:
    """The known peers sorted by id, after waiting (polling) until at least `wait_for_peers` are known."""
    return await known_peers(self._peers, wait_for_peers, min(0.1, self.poll_interval))

  def announce(self, capabilities: DeviceCapabilities) -> None:
    """Nothing to announce: peers learn this node's capabilities when they collect the topology from it."""

  async def _poll_forever(self) -> None:
    while True:
      try:
        await self.poll()
      except Exception:  # a bug, e.g. in create_peer_handle: log it and keep discovering
        log.exception("manual discovery poll failed")
      await asyncio.sleep(self.poll_interval)

  def _reload(self) -> None:
    try:
      self._config = load_peers_file(self.config_path, self.node_id)
    except BadInput as e:
      if str(e) != self._problem:
        log.warning("%s; keeping the last good peers list", e)
      self._problem = str(e)
      return
    if self._problem is not None:
      log.info("peers file %s is readable again", self.config_path)
    self._problem = None

  async def _drop(self, peer_id: str, why: str) -> None:
    peer = self._peers.pop(peer_id)
    log.info("dropping peer %s at %s: %s", peer_id, peer.addr, why)
    await disconnect(peer.handle)

  async def poll(self) -> None:
    """Re-read the file, apply its changes, health-check every configured peer and evict the stale ones."""
    self._reload()
    for peer_id in [i for i in self._peers if i not in self._config]:
      await self._drop(peer_id, "removed from the peers file")
    for peer_id, (addr, caps) in self._config.items():
      peer = self._peers.get(peer_id)
      if peer is not None and (peer.addr, peer.caps) != (addr, caps):
        await self._drop(peer_id, f"the peers file now says {addr}")
        peer = None
      if peer is None:
        self._peers[peer_id] = _Peer(self.create_peer_handle(peer_id, addr, caps), addr, caps)
    checked = list(self._peers.items())
    results = await asyncio.gather(*(health_check(p.handle, self.health_check_timeout) for _, p in checked))
    now = time.monotonic()
    for (peer_id, peer), ok in zip(checked, results):
      if self._peers.get(peer_id) is not peer:
        continue
      if ok:
        if not peer.known:
          log.info("found peer %s at %s", peer_id, peer.addr)
        peer.known, peer.last_ok = True, now
      elif peer.known and now - peer.last_ok > self.discovery_timeout:
        await self._drop(peer_id, f"no healthy answer for {self.discovery_timeout} s")
