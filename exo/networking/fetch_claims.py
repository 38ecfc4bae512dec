"""Which node of a cluster fetches a file from the hub when several need it at once: the holder of the earliest claim.

A claim is a Lamport timestamp (a counter the node raises past every claim it hears of) with the node's id to break ties, so
claims are totally ordered and every node orders them alike. A node claims a file when it starts to need it, then asks every
peer; each peer raises its own counter past the claim it is asked with and answers with its own claim on the file, if any. A
peer that starts to need the file after it answered claims later than the asker; one that needed it before answers with its
claim. So the node whose claim is earliest among the answers it got is the only one that fetches from the hub, and the others
stream the file from it as it arrives (exo.networking.peer_files). A claim lasts while its node works on the file.
"""

__all__ = ["FetchClaims"]


class FetchClaims:
  def __init__(self, node_id: str):
    self.node_id = node_id
    self.clock = 0
    self.own: dict[str, int] = {}  # file key: this node's claim on it

  def claim(self, key: str) -> int:
    """This node's claim on `key`, made now if it has none."""
    if key not in self.own:
      self.clock += 1
      self.own[key] = self.clock
    return self.own[key]

  def heard(self, claim: int) -> None:
    """A peer's claim (0: none): later claims of this node come after it."""
    self.clock = max(self.clock, claim)

  def release(self, key: str) -> None:
    self.own.pop(key, None)

  def earliest(self, key: str, others: dict[str, int]) -> bool:
    """Whether this node's claim on `key` comes before every claim in `others` (node id: claim; 0 or absent: none)."""
    mine = (self.own[key], self.node_id)
    return all(mine < (claim, node_id) for node_id, claim in others.items() if claim > 0)
