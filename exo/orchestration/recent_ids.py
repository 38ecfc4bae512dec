"""A set that remembers only the latest ids added: finished requests, whose late messages a node drops. O(1) add and lookup."""

from collections import OrderedDict


class RecentIds:
  """The last `capacity` ids added; adding one more forgets the oldest (a request's late messages arrive within seconds, long
  before thousands of later requests have finished)."""

  def __init__(self, capacity: int = 4096):
    if capacity < 1:
      raise ValueError(f"capacity must be >= 1, got {capacity!r}")
    self.capacity = capacity
    self._ids: OrderedDict[str, None] = OrderedDict()

  def add(self, request_id: str) -> None:
    self._ids[request_id] = None
    self._ids.move_to_end(request_id)
    if len(self._ids) > self.capacity:
      self._ids.popitem(last=False)

  def __contains__(self, request_id: object) -> bool:
    return request_id in self._ids

  def __len__(self) -> int:
    return len(self._ids)
