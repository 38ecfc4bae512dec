"""How a node talks to one peer. The gRPC implementation is in exo/networking/grpc; tests may fake it."""

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from exo.base.device_capabilities import DeviceCapabilities
from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.inference.hub_files import HubFile
from exo.networking.request_context import RequestContext


@dataclass(frozen=True)
class FileState:
  """What a peer holds of a model file: the bytes from its start it can send now, whether that is all of it, whether a transfer
  into it runs there, and its claim to fetch the file from the hub (exo.networking.fetch_claims; 0: none)."""

  held_bytes: int = 0
  whole: bool = False
  arriving: bool = False
  claim: int = 0


class Refused(Exception):
  """The peer answered that it does not take a ring message (malformed, not allowed, or beyond its limits); the message says why."""


class PeerHandle(ABC):
  @abstractmethod
  def id(self) -> str:
    pass

  @abstractmethod
  def addr(self) -> str:
    """host:port the peer's NodeService listens on (possibly through a proxy)."""

  @abstractmethod
  def device_capabilities(self) -> DeviceCapabilities:
    pass

  @abstractmethod
  async def disconnect(self) -> None:
    pass

  @abstractmethod
  async def health_check(self, timeout: float = 2.0) -> bool:
    """One round trip to the peer; False (never an exception) if it does not answer healthy within `timeout` seconds."""

  @abstractmethod
  async def send_prompt(self, shard: Shard, prompt: str, context: RequestContext) -> None:
    """Raises Refused if the peer does not take it (as send_tensor and send_tensors do)."""

  @abstractmethod
  async def send_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext) -> None:
    pass

  async def send_tensors(self, tensors: list[tuple[Shard, np.ndarray, RequestContext]]) -> None:
    """Several steps' hidden states at once, in order (the outputs of one batched engine call). By default one send each."""
    for shard, tensor, context in tensors:
      await self.send_tensor(shard, tensor, context)

  @abstractmethod
  async def send_result(self, request_id: str, tokens: list[int], is_finished: bool, error: str = "") -> None:
    pass

  @abstractmethod
  async def send_opaque_status(self, request_id: str, status: str) -> None:
    pass

  @abstractmethod
  async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
    pass

  async def file_status(self, file: HubFile, claim: int) -> FileState | None:
    """What the peer holds of `file`, telling it this node's `claim` on it; None if the peer serves no files."""
    return None

  def fetch_file(self, file: HubFile, offset: int, length: int) -> AsyncIterator[tuple[int, bytes]]:
    """The bytes of `file` from `offset`, `length` of them (0: to its end), as (offset, data) pieces in order, as they arrive
    at the peer; raises if the peer does not have them or the transfer breaks off."""
    raise NotImplementedError(f"{self!r} serves no files")
