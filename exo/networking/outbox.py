"""Hidden states bound for the same peer leave together: what a node sends in one turn of its event loop goes as one message.

The steps of a batched engine call finish together, and each request's task passes its output on; without this, b requests
cost b RPCs per hop and reach the next stage one by one, which must then wait for the stragglers before it can run them as
one call. Each send still waits for (and fails with) the message that carries it. O(1) per step, one RPC per peer and turn.
"""

import asyncio

import numpy as np

from exo.base.shard import Shard
from exo.networking.peer_handle import PeerHandle
from exo.networking.request_context import RequestContext

_Item = tuple[Shard, np.ndarray, RequestContext, asyncio.Future]


class Outbox:
  def __init__(self):
    self._waiting: dict[PeerHandle, list[_Item]] = {}
    self._sending: set[asyncio.Task] = set()

  async def send_tensor(self, peer: PeerHandle, shard: Shard, tensor: np.ndarray, context: RequestContext) -> None:
    """Send with the other steps bound for `peer` in this turn of the loop; raises what sending their message raised."""
    loop = asyncio.get_running_loop()
    items = self._waiting.setdefault(peer, [])
    if not items:
      loop.call_soon(self._flush, peer)  # after the tasks already woken in this turn have added their steps
    done = loop.create_future()
    items.append((shard, tensor, context, done))
    await done

  def _flush(self, peer: PeerHandle) -> None:
    task = asyncio.create_task(self._send(peer, self._waiting.pop(peer, [])))
    self._sending.add(task)
    task.add_done_callback(self._sending.discard)

  @staticmethod
  async def _send(peer: PeerHandle, items: list[_Item]) -> None:
    try:
      if len(items) == 1:
        await peer.send_tensor(*items[0][:3])
      else:
        await peer.send_tensors([item[:3] for item in items])
      error = None
    except Exception as e:
      error = e
    for *_, done in items:
      if done.done():
        continue  # its sender was cancelled
      if error is None:
        done.set_result(None)
      else:
        done.set_exception(error)
