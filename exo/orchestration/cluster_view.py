"""What a node knows of its cluster: its own device, its live peers (from discovery, with their measured RTT) and the topology
merged from every node's view, refreshed every `refresh_interval` seconds. Plans are made on `planning_topology()`."""

import asyncio
import logging
from dataclasses import replace
from typing import Iterable

from exo.base.device_capabilities import DeviceCapabilities
from exo.base.errors import ClusterCannotServe
from exo.base.topology import Topology
from exo.networking.discovery import Discovery
from exo.networking.peer_handle import PeerHandle
from exo.orchestration.requests import RequestFailed

log = logging.getLogger(__name__)
PEER_WAIT_S = 5.0  # how long a message waits for its ring neighbour to be discovered (nodes that just started)

__all__ = ["ClusterView", "PEER_WAIT_S"]


class ClusterView:
  def __init__(self, node_id: str, discovery: Discovery, capabilities: DeviceCapabilities, refresh_interval: float = 1.0):
    self.node_id = node_id
    self.discovery = discovery
    self.capabilities = capabilities
    self.refresh_interval = refresh_interval
    self.peers: dict[str, PeerHandle] = {}
    self.bandwidth_mbps: dict[str, float] = {}  # by peer: the rate of the last file piece from it
    self.topology = Topology()
    self.topology.update_node(node_id, capabilities)
    self._refresher: asyncio.Task | None = None

  async def start(self, wait_for_peers: int = 0, wait_timeout: float | None = None) -> None:
    """Discover peers and keep the topology fresh; with `wait_for_peers`, once that many peers are live, or ClusterCannotServe
    after `wait_timeout` seconds naming those that answered and those heard of that did not."""
    await self.discovery.start()
    try:
      await asyncio.wait_for(self.discovery.discover_peers(wait_for_peers), wait_timeout)
    except asyncio.TimeoutError:
      live, silent = sorted(p.id() for p in await self.discovery.discover_peers()), self.discovery.silent_peers()
      raise ClusterCannotServe(
        f"waited {wait_timeout:g} s for {wait_for_peers} peer(s): {len(live)} answered ({', '.join(live) or 'none'})"
        + (f", {', '.join(silent)} did not" if silent else "")
        + "; start the missing nodes, or check that they are on this network with the same --broadcast-port and --listen-port "
        "(or in the --discovery-config-path file)"
      ) from None
    await self.refresh()
    self._refresher = asyncio.create_task(self._refresh_forever())

  async def stop(self) -> None:
    if self._refresher:
      self._refresher.cancel()
    await self.discovery.stop()
    for peer in self.peers.values():
      await peer.disconnect()

  async def _refresh_forever(self) -> None:
    while True:
      await asyncio.sleep(self.refresh_interval)
      try:
        await self.refresh()
      except Exception:
        log.exception("topology refresh failed")

  async def refresh(self, wait_for_peers: int = 0) -> None:
    """Take the live peers (and their RTT) from discovery, and rebuild the topology from every node's view."""
    self.peers = {p.id(): p for p in await self.discovery.discover_peers(wait_for_peers)}
    self.topology = await self.collect_topology({self.node_id}, max_depth=1)

  def publish(self, capabilities: DeviceCapabilities) -> None:
    """This node's device changed (its measured layer times): its topology entry and its announcements carry it."""
    self.capabilities = capabilities
    self.topology.update_node(self.node_id, capabilities)
    self.discovery.announce(capabilities)

  def rtt_ms(self, node_id: str) -> float | None:
    return self.discovery.rtt_ms(node_id)

  def measured_bandwidth(self, node_id: str, mbps: float) -> None:
    """The rate a transfer from peer `node_id` ran at (a file from it): the bandwidth of this node's edge to it."""
    self.bandwidth_mbps[node_id] = mbps

  def local_view(self) -> Topology:
    """This node, its live peers and its own measured outgoing edges."""
    view = Topology()
    view.update_node(self.node_id, self.capabilities)
    for peer_id, peer in self.peers.items():
      view.update_node(peer_id, peer.device_capabilities())
      view.add_edge(self.node_id, peer_id, self.discovery.rtt_ms(peer_id), self.bandwidth_mbps.get(peer_id))
    return view

  async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
    """Own view merged with the views of peers not yet visited, `max_depth` levels deep: their devices and the edges between
    live nodes. Unreachable peers are skipped, and so are nodes this one does not list as live."""
    topology = self.local_view()
    if max_depth <= 0:
      return topology
    todo = [p for p in self.peers.values() if p.id() not in visited]
    seen = visited | {self.node_id} | {p.id() for p in todo}
    views = await asyncio.gather(*(p.collect_topology(seen, max_depth - 1) for p in todo), return_exceptions=True)
    for peer, view in zip(todo, views):
      if isinstance(view, Exception):
        log.info("could not collect topology from %s: %s", peer.id(), view)
        continue
      # Only this node and its live peers: a node another lists may have left (it lists it until its discovery timeout) and is
      # left out of plans here anyway (planning_topology). A node is the authority on its own device.
      if peer.id() in view.nodes:
        topology.update_node(peer.id(), view.nodes[peer.id()])
      for (a, b), edge in view.edges.items():
        if a != self.node_id and a in topology.nodes and b in topology.nodes:
          topology.add_edge(a, b, edge.rtt_ms, edge.bandwidth_mbps)
    return topology

  def planning_topology(self, ignore_layer_times: bool = False) -> Topology:
    """The topology without the nodes this node does not list as peers (those that just failed a request and a health check are
    not listed): every ring node sends its results here, and other nodes list a peer that died until their discovery timeout,
    so a new node would plan with it.
    With `ignore_layer_times`, without the nodes' measured layer times."""
    usable = {self.node_id} | set(self.peers)
    if set(self.topology.nodes) <= usable and not ignore_layer_times:
      return self.topology
    kept = Topology()
    for node_id, caps in self.topology.nodes.items():
      if node_id in usable:
        kept.update_node(node_id, replace(caps, layer_times={}) if ignore_layer_times else caps)
    for (a, b), edge in self.topology.edges.items():
      if a in kept.nodes and b in kept.nodes:
        kept.add_edge(a, b, edge.rtt_ms, edge.bandwidth_mbps)
    return kept

  async def check(self, node_ids: Iterable[str]) -> list[str]:
    """Have discovery health-check these nodes (this one aside) now; those that fail (or are no longer peers) are left out of
    the peers, and so of plans, until they answer again. Returns them in the order given."""
    node_ids = list(node_ids)
    failed = await self.discovery.check_now(n for n in node_ids if n != self.node_id)
    self.peers = {p.id(): p for p in await self.discovery.discover_peers()}
    return [n for n in node_ids if n in failed]

  async def peer(self, node_id: str, role: str) -> PeerHandle:
    """The handle for a node this one must reach, `role` naming why; one not discovered yet (it may have just started) is
    waited for briefly, then RequestFailed."""
    waited = 0.0
    while node_id not in self.peers and waited < PEER_WAIT_S:
      await asyncio.sleep(0.1)
      waited += 0.1
      self.peers.update({p.id(): p for p in await self.discovery.discover_peers(0)})
    if node_id not in self.peers:
      raise RequestFailed(f"node {self.node_id!r} has no connection to {node_id!r}, {role}")
    return self.peers[node_id]
