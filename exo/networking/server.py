"""The seams between the wire and a node: a server that starts and stops, and the node it serves."""

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np

from exo.base.shard import Shard
from exo.base.topology import Topology
from exo.inference.hub_files import HubFile
from exo.networking.peer_handle import FileState
from exo.networking.request_context import RequestContext


class Server(ABC):
  @abstractmethod
  async def start(self) -> None:
    pass

  @abstractmethod
  async def stop(self) -> None:
    pass


class RingNode(Protocol):
  """What a server needs of the node behind it: the ring's messages, results and status, topology collection, health and the
  model files it shares with its peers (exo.networking.peer_files). A
  server passes every message with `sender`, the id the calling node gave (a node's own calls pass none)."""

  id: str

  async def process_prompt(self, shard: Shard, prompt: str, context: RequestContext, sender: str | None = None) -> None: ...

  async def process_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext, sender: str | None = None) -> None: ...

  def process_result(self, request_id: str, tokens: list[int], is_finished: bool, error: str, sender: str | None = None) -> None: ...

  def process_opaque_status(self, request_id: str, status: str, sender: str | None = None) -> None: ...

  async def collect_topology(self, visited: set[str], max_depth: int) -> Topology: ...

  def is_healthy(self) -> bool: ...

  def file_status(self, file: HubFile, claim: int) -> FileState: ...

  def file_chunks(self, file: HubFile, offset: int, length: int) -> AsyncIterator[tuple[int, bytes]]: ...
