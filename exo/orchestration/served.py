"""The requests whose stages run on a node, and who may change each: its origin and the nodes of its ring.

A node counts them in its load and its limit (--max-requests) as it counts the requests it is the origin of, and takes a
request's cancellation only from them. A request leaves when it is finished here, or after `idle_s` without a message (its
origin is gone: nobody will tell this node that it is over).
"""

import time
from dataclasses import dataclass

from exo.networking.request_context import RequestContext


@dataclass
class _Served:
  senders: frozenset[str]  # the request's origin and ring nodes
  last_seen: float  # time.monotonic() of its last message here


class ServedRequests:
  def __init__(self, idle_s: float):
    self.idle_s = idle_s
    self._by_id: dict[str, _Served] = {}

  def track(self, context: RequestContext) -> None:
    """A message of the request reached this node's stage: it runs here (from now, or still)."""
    served = self._by_id.get(context.request_id)
    if served is None:
      senders = frozenset([context.origin_node_id, *context.plan.node_ids()])
      self._by_id[context.request_id] = _Served(senders, time.monotonic())
    else:
      served.last_seen = time.monotonic()

  def senders(self, request_id: str) -> frozenset[str] | None:
    """The nodes that may change the request (None: it does not run here)."""
    served = self._by_id.get(request_id)
    return None if served is None else served.senders

  def forget(self, request_id: str) -> None:
    self._by_id.pop(request_id, None)

  def ids(self) -> set[str]:
    """The requests running here now (those idle for `idle_s` are forgotten first)."""
    stale = time.monotonic() - self.idle_s
    for request_id in [r for r, served in self._by_id.items() if served.last_seen < stale]:
      del self._by_id[request_id]
    return set(self._by_id)

  def __contains__(self, request_id: object) -> bool:
    return request_id in self._by_id
