"""How a node sends a request's messages: to a ring neighbour or to itself (the same handlers the gRPC server calls), results
to the request's origin (retried while its channel reconnects), the end of a request to every ring node, and a failure the
origin cannot be told directly through a peer that can."""

import asyncio
import json
import logging
import time
from typing import Protocol

import numpy as np

from exo.base.shard import Shard
from exo.networking.outbox import Outbox
from exo.networking.peer_handle import Refused
from exo.networking.request_context import RequestContext, RingPlan
from exo.orchestration.cluster_view import PEER_WAIT_S, ClusterView
from exo.orchestration.requests import RequestFailed

log = logging.getLogger(__name__)

__all__ = ["Messenger", "Receiver"]


class Receiver(Protocol):
  """What a node does with a message, whether it came over the wire (`sender`: the peer) or from itself (`sender` None)."""

  async def process_prompt(self, shard: Shard, prompt: str, context: RequestContext, sender: str | None = None) -> None: ...

  async def process_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext, sender: str | None = None) -> None: ...

  def process_result(self, request_id: str, tokens: list[int], is_finished: bool, error: str, sender: str | None = None) -> None: ...

  def process_opaque_status(self, request_id: str, status: str, sender: str | None = None) -> None: ...


class Messenger:
  def __init__(self, cluster: ClusterView, local: Receiver):
    self.cluster = cluster
    self.local = local  # this node's own handlers: a message to itself skips the wire
    self.outbox = Outbox()  # hidden states leave one message per peer and turn of the event loop

  @property
  def node_id(self) -> str:
    return self.cluster.node_id

  async def deliver(self, node_id: str, shard: Shard, payload: str | np.ndarray, context: RequestContext) -> None:
    """A prompt (str) or a tensor for `node_id`'s stage `shard`; RequestFailed if that node cannot be reached or refuses it."""
    prompt = isinstance(payload, str)
    if node_id == self.node_id:
      await (self.local.process_prompt if prompt else self.local.process_tensor)(shard, payload, context)
      return
    peer = await self.cluster.peer(node_id, "the next node on the request's ring")
    try:
      if prompt:
        await peer.send_prompt(shard, payload, context)
      else:
        await self.outbox.send_tensor(peer, shard, payload, context)
    except Exception as e:
      if isinstance(e, Refused):
        raise RequestFailed(f"node {node_id!r} refused request {context.request_id}: {e}") from e
      raise RequestFailed(f"node {self.node_id!r} could not reach {node_id!r}: {type(e).__name__}") from e

  async def report(self, context: RequestContext, tokens: list[int], finished: bool, error: str = "") -> None:
    """The request's tokens so far (or its failure) to its origin."""
    origin, request_id = context.origin_node_id, context.request_id
    if origin == self.node_id:
      self.local.process_result(request_id, tokens, finished, error)
      return
    peer = await self.cluster.peer(origin, f"which asked for request {request_id}")
    # A result may be sent twice, so it is retried for a while: an origin restarted under the same id (a second `exo run`) is
    # reached through the channel to the first process, which gRPC keeps failing at once while it backs off between reconnects.
    deadline = time.monotonic() + PEER_WAIT_S
    while True:
      try:
        await peer.send_result(request_id, tokens, finished, error)
        return
      except Exception:
        if time.monotonic() >= deadline:
          raise
        await asyncio.sleep(0.2)

  async def broadcast_finish(self, ring: RingPlan, request_id: str) -> None:
    """Tell every ring node, all at once, that the request is over; a dead node (it has no state left) costs one timeout."""
    status = json.dumps({"type": "finish", "request_id": request_id})

    async def tell(node_id: str) -> None:
      try:
        if node_id == self.node_id:
          self.local.process_opaque_status(request_id, status)
        elif node_id in self.cluster.peers:
          await asyncio.wait_for(self.cluster.peers[node_id].send_opaque_status(request_id, status), 2.0)
      except Exception as e:
        log.info("could not tell %s that request %s finished: %s", node_id, request_id, e)

    await asyncio.gather(*(tell(node_id) for node_id in ring.node_ids()))

  async def pass_on_failure(self, request_id: str, origin: str, error: str, reporter: str | None) -> None:
    """A ring node, `reporter`, that could not reach `origin` asked this one to tell it that the request failed: the origin takes
    the failure as the reporter's (it takes results only from the request's ring)."""
    status = json.dumps({"type": "failed", "origin": origin, "error": error, "reporter": reporter or self.node_id})
    try:
      await (await self.cluster.peer(origin, f"which asked for request {request_id}")).send_opaque_status(request_id, status)
    except Exception as e:
      log.warning("could not pass on the failure of request %s to %s: %s", request_id, origin, e)

  async def relay_failure(self, context: RequestContext, reason: str) -> None:
    """Ask the peers, one after another, to tell the origin that the request failed, until one takes it on."""
    status = json.dumps({"type": "failed", "origin": context.origin_node_id, "error": reason})
    for peer_id, peer in sorted(self.cluster.peers.items()):
      if peer_id == context.origin_node_id:
        continue
      try:
        await asyncio.wait_for(peer.send_opaque_status(context.request_id, status), 2.0)
        return
      except Exception as e:
        log.info("%s could not take on the failure of request %s: %s", peer_id, context.request_id, e)
