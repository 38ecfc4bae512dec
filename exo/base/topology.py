"""The cluster as the planner sees it: nodes with device capabilities and directed, measured edges."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from exo.base.device_capabilities import DeviceCapabilities, non_negative_number, reject_unknown_keys, unicode_text
from exo.base.errors import BadInput
from exo.base.files import read_bytes


@dataclass(frozen=True)
class Edge:
  """A directed measurement from `from_id` to `to_id`: round trip time in ms and bandwidth in Mbit/s (None when not measured)."""

  from_id: str
  to_id: str
  rtt_ms: float | None = None
  bandwidth_mbps: float | None = None

  def to_dict(self) -> dict:
    out = {"from": self.from_id, "to": self.to_id}
    if self.rtt_ms is not None:
      out["rtt_ms"] = self.rtt_ms
    if self.bandwidth_mbps is not None:
      out["bandwidth_mbps"] = self.bandwidth_mbps
    return out


class Topology:
  """Nodes keyed by id and directed edges keyed by (from, to). An edge in either direction makes two nodes neighbours."""

  def __init__(self):
    self.nodes: dict[str, DeviceCapabilities] = {}
    self.edges: dict[tuple[str, str], Edge] = {}

  def update_node(self, node_id: str, capabilities: DeviceCapabilities) -> None:
    self.nodes[node_id] = capabilities

  def all_nodes(self) -> Iterable[tuple[str, DeviceCapabilities]]:
    return self.nodes.items()

  def add_edge(self, from_id: str, to_id: str, rtt_ms: float | None = None, bandwidth_mbps: float | None = None) -> None:
    """Record (or replace) the measurement on the directed edge from_id -> to_id."""
    if from_id == to_id:
      raise BadInput(f"an edge must join two different nodes, got {from_id!r} to itself")
    self.edges[(from_id, to_id)] = Edge(from_id, to_id, rtt_ms, bandwidth_mbps)

  def neighbours(self, node_id: str) -> list[str]:
    found = {b for a, b in self.edges if a == node_id} | {a for a, b in self.edges if b == node_id}
    return sorted(found)

  def are_neighbours(self, u: str, v: str) -> bool:
    return (u, v) in self.edges or (v, u) in self.edges

  def pair_rtt_ms(self, u: str, v: str) -> float | None:
    """Mean RTT over the edges u->v and v->u that carry one; None if neither does."""
    return _mean(e.rtt_ms for e in self._pair_edges(u, v))

  def pair_bandwidth_mbps(self, u: str, v: str) -> float | None:
    """Mean bandwidth over the edges u->v and v->u that give one (> 0); None if neither does."""
    return _mean(e.bandwidth_mbps for e in self._pair_edges(u, v) if e.bandwidth_mbps)

  def _pair_edges(self, u: str, v: str) -> list[Edge]:
    return [e for e in (self.edges.get((u, v)), self.edges.get((v, u))) if e is not None]

  def to_dict(self) -> dict:
    return {
      "nodes": {node_id: caps.to_dict() for node_id, caps in sorted(self.nodes.items())},
      "edges": [edge.to_dict() for _, edge in sorted(self.edges.items())],
    }

  @staticmethod
  def from_dict(data: dict) -> "Topology":
    """Build and validate a topology from the topology JSON format; any problem is one BadInput naming it."""
    if not isinstance(data, dict):
      raise BadInput(f"a topology must be a JSON object with 'nodes' and 'edges', got {type(data).__name__}")
    reject_unknown_keys(data, {"nodes", "edges"}, "topology")
    nodes, edges = data.get("nodes"), data.get("edges", [])
    if not isinstance(nodes, dict) or not nodes:
      raise BadInput("topology 'nodes' must be a non-empty JSON object mapping node ids to devices")
    if not isinstance(edges, list):
      raise BadInput(f"topology 'edges' must be a JSON list, got {type(edges).__name__}")
    topology = Topology()
    for node_id, caps in nodes.items():
      if not isinstance(node_id, str) or not node_id:
        raise BadInput(f"node ids must be non-empty strings, got {node_id!r}")
      unicode_text(node_id, "a node id")
      topology.update_node(node_id, DeviceCapabilities.from_dict(caps, f"node {node_id!r}"))
    for index, edge in enumerate(edges):
      where = f"edge #{index}"
      if not isinstance(edge, dict):
        raise BadInput(f"{where} must be a JSON object with 'from' and 'to', got {edge!r}")
      reject_unknown_keys(edge, {"from", "to", "rtt_ms", "bandwidth_mbps"}, where)
      from_id, to_id = edge.get("from"), edge.get("to")
      for end in (from_id, to_id):
        if end not in topology.nodes:
          raise BadInput(f"{where} names unknown node {end!r}; known nodes are {', '.join(sorted(topology.nodes))}")
      if (from_id, to_id) in topology.edges:
        raise BadInput(f"duplicate edge from {from_id!r} to {to_id!r}")
      rtt, bandwidth = edge.get("rtt_ms"), edge.get("bandwidth_mbps")
      topology.add_edge(
        from_id,
        to_id,
        None if rtt is None else non_negative_number(rtt, f"{where}.rtt_ms"),
        None if bandwidth is None else non_negative_number(bandwidth, f"{where}.bandwidth_mbps", speed=True),
      )
    return topology

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @staticmethod
  def from_json(text: str, source: str = "topology") -> "Topology":
    return Topology.from_dict(parse_json(text, source))

  @staticmethod
  def load(path: str | Path) -> "Topology":
    return Topology.from_json(read_text(path, "topology file"), str(path))

  def __eq__(self, other) -> bool:
    return isinstance(other, Topology) and self.nodes == other.nodes and self.edges == other.edges

  def __repr__(self) -> str:
    return f"Topology({len(self.nodes)} nodes, {len(self.edges)} edges)"


def _mean(values: Iterable[float | None]) -> float | None:
  known = [v for v in values if v is not None]
  return sum(known) / len(known) if known else None


def _no_duplicate_keys(pairs: list) -> dict:
  out = {}
  for key, value in pairs:
    if key in out:
      raise BadInput(f"duplicate key {key!r}: each node id (and each JSON key) may appear only once")
    out[key] = value
  return out


def _reject_constant(name: str):
  raise BadInput(f"{name} is not a number JSON allows; use a finite number")


def parse_json(text: str, source: str):
  """Parse JSON strictly (no duplicate keys, no NaN/Infinity) into plain data, with a one-line BadInput on failure."""
  try:
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
  except json.JSONDecodeError as e:
    raise BadInput(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  except RecursionError:
    raise BadInput(f"{source} nests arrays or objects too deeply to be a topology or model spec") from None


MAX_FILE_BYTES = 16 << 20  # a topology or model spec file: a 1,000-node topology is about 1 MB


def read_text(path: str | Path, what: str) -> str:
  """A topology or model spec file's text: a regular file (never a FIFO, a device or a directory) of at most MAX_FILE_BYTES."""
  try:
    return read_bytes(path, what, MAX_FILE_BYTES).decode("utf-8")
  except UnicodeDecodeError:
    raise BadInput(f"{what} {str(path)!r} is not UTF-8 text") from None
