"""A request at the node that received it: what admission gave it, what it ends with, and the failure that ends it early."""

from dataclasses import dataclass

from exo.topology.plan import Plan

__all__ = ["Admission", "Generation", "LastRequest", "RequestFailed"]


class RequestFailed(Exception):
  """A request that could not complete: a node on its ring failed or the deadline passed. The message says which."""


@dataclass(frozen=True)
class Admission:
  """A request the node takes: the plan it runs on, how many tokens its answer may have, and its id, under which it holds its
  place among the node's requests from admission on (`generate` runs it; `release` frees the place of one never run)."""

  plan: Plan
  max_tokens: int
  request_id: str
  prompt_tokens: int = 0


@dataclass
class Generation:
  """A finished request at the node that received it."""

  request_id: str
  tokens: list[int]
  text: str
  plan: Plan
  elapsed_s: float
  finish_reason: str  # "stop": an end-of-sequence token or a stop string ended it (the text ends before it); "length": the budget


@dataclass(frozen=True)
class LastRequest:
  """The last request the node received, whatever its outcome: "stop" or "length" (finished, as Generation.finish_reason),
  "cancelled" (its client went away or stopped it) or "failed" (`error` says why); measured from its start to its end here,
  against what its plan predicts for its own prompt and answer: TTFT for `prompt_tokens` + (tokens - 1) x TPOT."""

  request_id: str
  model_id: str
  ring: list[str]
  prompt_tokens: int
  tokens: int
  elapsed_s: float
  outcome: str
  error: str = ""
  predicted_ttft_s: float | None = None
  predicted_tpot_s: float | None = None

  @property
  def predicted_s(self) -> float | None:
    if self.predicted_ttft_s is None or self.predicted_tpot_s is None:
      return None
    return self.predicted_ttft_s + max(self.tokens - 1, 0) * self.predicted_tpot_s

  def to_dict(self) -> dict:
    ms = lambda s: None if s is None else s * 1000  # noqa: E731
    return {
      "request_id": self.request_id, "model": self.model_id, "ring": self.ring, "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
      "elapsed_s": self.elapsed_s, "outcome": self.outcome, "error": self.error, "predicted_s": self.predicted_s,
      "predicted_ttft_ms": ms(self.predicted_ttft_s), "predicted_tpot_ms": ms(self.predicted_tpot_s),
    }  # fmt: skip
