"""Discovery from a peers file the user writes, for networks where broadcast does not reach (VPNs, routed subnets).

The file, upstream exo's shape (`device_capabilities` optional; the node's own entry is skipped, so one file can
serve every node):

  {"peers": {"node2": {"address": "192.168.1.12", "port": 50052, "device_capabilities": {...}}}}

Every `poll_interval` the file is re-read and every configured peer health-checked (by a `Liveness`, concurrently). A peer
is listed from its first successful health check until its last one is older than `discovery_timeout` (then it is evicted
and disconnected) or it leaves the file.
"""

import asyncio
import contextlib
import json
import logging

from exo.base.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities, reject_unknown_keys
from exo.base.errors import BadInput
from exo.networking.discovery import CheckedDiscovery, CreatePeerHandle, host_port
from exo.networking.liveness import Liveness, disconnect

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


class ManualDiscovery(CheckedDiscovery):
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
    self.poll_interval, self.poll_s = poll_interval, min(0.1, poll_interval)
    self.liveness = Liveness(health_check_timeout, discovery_timeout)
    self._config: dict[str, tuple[str, DeviceCapabilities]] = {}
    self._made: dict[str, tuple[str, DeviceCapabilities]] = {}  # by peer id: the entry its tracked handle was made from
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
    self._made = {}
    await self.liveness.forget_all()

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

  async def poll(self) -> None:
    """Re-read the file, apply its changes, and health-check every configured peer (evicting the stale ones)."""
    self._reload()
    for peer_id in list(self._made):
      entry = self._config.get(peer_id)
      if entry != self._made[peer_id]:
        del self._made[peer_id]
        if peer_id in self.liveness.peers:
          why = "removed from the peers file" if entry is None else f"the peers file now says {entry[0]}"
          await disconnect(self.liveness.forget(peer_id, why))
    for peer_id, (addr, caps) in self._config.items():
      if peer_id not in self.liveness.peers:
        self._made[peer_id] = (addr, caps)
        self.liveness.track(peer_id, self.create_peer_handle(peer_id, addr, caps))
    await self.liveness.check()
