"""A request at the node that received it: what admission gave it, what it ends with, and the failure that ends it early."""

from dataclasses import dataclass

from exo.topology.plan import Plan

__all__ = ["Admission", "Generation", "RequestFailed"]


class RequestFailed(Exception):
  """A request that could not complete: a node on its ring failed or the deadline passed. The message says which."""


@dataclass(frozen=True)
class Admission:
  """A request the node takes: the plan it runs on, how many tokens its answer may have, and its id, under which it holds its
  place among the node's requests from admission on (`generate` runs it; `release` frees the place of one never run)."""

  plan: Plan
  max_tokens: int
  request_id: str


@dataclass
class Generation:
  """A finished request at the node that received it."""

  request_id: str
  tokens: list[int]
  text: str
  plan: Plan
  elapsed_s: float
  finish_reason: str  # "stop": an end-of-sequence token or a stop string ended it (the text ends before it); "length": the budget
