"""Whether a node takes one more request, and how long its answer may be: the limit on requests at once (--max-requests), the
answer's token budget within the planned context, and, for engines whose speed the plan predicts, whether everything admitted
is still predicted to be answered before the earliest deadline."""

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Collection

from exo.base.errors import BadInput, Busy
from exo.topology.flops_latency_partitioning_strategy import DEFAULT_PROMPT_TOKENS
from exo.topology.plan import Plan

__all__ = ["ADMIT_SHARE", "AdmissionPolicy", "OpenRequest", "answer_budget", "drain_s", "predicted_speed"]

ADMIT_SHARE = 0.8  # admitted work must be predicted to end within this share of the time to the earliest deadline: the margin for error


@dataclass
class OpenRequest:
  """A request a node is the origin of, from its admission to its last token."""

  future: asyncio.Future
  tokens: list[int] = field(default_factory=list)
  on_token: Callable[[list[int]], None] | None = None
  last_progress: float = field(default_factory=time.monotonic)  # when the last token came (or the request started)
  arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set when tokens come; the stop-string watch clears it
  budget: int = 0  # the tokens it was admitted for
  prefill_s: float = 0.0  # its prompt's predicted prefill, owed until its first token
  deadline: float = math.inf  # time.monotonic() at which it times out
  running: bool = False  # `generate` runs it, and releases it when over
  senders: frozenset[str] = frozenset()  # the nodes of its ring: the others' results are ignored


def drain_s(owed: list[tuple[float, int]], tpot_s: float, throughput_tps: float) -> float:
  """Predicted seconds until requests that still owe (prefill seconds, tokens) each are all answered, on a ring of `tpot_s`
  seconds per token for one request and `throughput_tps` tokens/s when saturated:

    sum(prefill) + max(sum(tokens) / throughput, max(tokens) x tpot)

  the prefills one after another (they take whole stages), then every token at the saturated rate but no sooner than the
  longest answer alone takes (one request's tokens come one after another). Every request is answered by then whatever order
  the stages serve them in: this bounds the last of them."""
  if not owed:
    return 0.0
  tokens = [n for _, n in owed]
  return sum(p for p, _ in owed) + max(sum(tokens) / throughput_tps, max(tokens) * tpot_s)


def predicted_speed(plan: Plan | None) -> tuple[float, float] | None:
  """(TPOT seconds, saturated tokens/s) the plan predicts, or None if it predicts no speed."""
  prediction = plan.prediction if plan is not None else None
  if prediction is None or prediction.tpot_s is None or not prediction.throughput_tps:
    return None
  return prediction.tpot_s, prediction.throughput_tps


def answer_budget(prompt_tokens: int, requested: int | None, context: int, most: int, what: str = "the planned context") -> int:
  """How many tokens the answer to a prompt of `prompt_tokens` may have in a context of `context` tokens (`what` names it): the
  client's `requested` max_tokens if the prompt and it fit (BadInput naming both numbers if not), else what the context leaves
  after the prompt; at most `most` (--max-generate-tokens) either way. BadInput if the prompt leaves no room for one token."""
  if prompt_tokens >= context:
    raise BadInput(
      f"the prompt is {prompt_tokens} tokens, beyond {what} of {context} tokens (the answer included): a prompt may have at most {context - 1}"
    )
  if requested is not None and prompt_tokens + requested > context:
    raise BadInput(
      f"the prompt is {prompt_tokens} tokens and max_tokens is {requested}: {prompt_tokens + requested} tokens, beyond {what} of "
      f"{context} tokens; ask for at most {context - prompt_tokens}"
    )
  return min(requested or most, most, context - prompt_tokens)


class AdmissionPolicy:
  """A node's rules for taking requests: at most `max_requests` at once (as origin or stage); with `admit_by_rate`, also only
  what the plan's predicted rate finishes in time."""

  def __init__(self, node_id: str, max_requests: int, request_timeout: float, admit_by_rate: bool):
    self.node_id = node_id
    self.max_requests = max_requests
    self.request_timeout = request_timeout
    self.admit_by_rate = admit_by_rate

  def prefill_s(self, plan: Plan, prompt_tokens: int, budget: int, running: int, open_requests: Collection[OpenRequest]) -> float:
    """Whether the node takes one more request, of `budget` tokens after a prompt of `prompt_tokens` on `plan`, with `running`
    requests on it and `open_requests` of its own; else Busy with the seconds after which to ask again. Returns the request's
    predicted prefill seconds (0 if the plan predicts no speed).

    Always: at most `max_requests` at once. With `admit_by_rate`, when others run and the plan predicts a speed, also only if
    everything admitted, this request included, is predicted to be answered (drain_s of what each still owes: a prefill until
    its first token, its budget less the tokens it has) within ADMIT_SHARE of the time to the earliest deadline among them
    (this one's: now + the request timeout). So a request admitted later never makes an earlier one time out, as long as the
    ring runs at its predicted rate (measured layer times make it the engine's). The prefill is the plan's TTFT, scaled up
    linearly from the prompt length it was predicted for. A node with nothing running always takes one request."""
    speed = predicted_speed(plan)
    if running >= self.max_requests:
      raise self.full(plan, running, open_requests)
    if speed is None:
      return 0.0
    prefill_s = (plan.prediction.ttft_s or 0.0) * max(1.0, prompt_tokens / DEFAULT_PROMPT_TOKENS)
    if not self.admit_by_rate or not open_requests:
      return prefill_s
    now = time.monotonic()
    earliest = min([p.deadline for p in open_requests] + [now + self.request_timeout])
    needed = self.owed_s(speed, open_requests, (prefill_s, budget))
    if needed > ADMIT_SHARE * (earliest - now):
      raise Busy(
        f"node {self.node_id!r} cannot take a request of up to {budget} tokens now: with the {len(open_requests)} it runs it would "
        f"take {needed:.1f} s at the predicted rate, beyond {ADMIT_SHARE:g} of the {earliest - now:.1f} s before the earliest deadline",
        self.retry_after_s(speed, open_requests),
      )
    return prefill_s

  def full(self, plan: Plan | None, running: int, open_requests: Collection[OpenRequest]) -> Busy:
    """The refusal of a node that runs `running` requests, its limit."""
    return Busy(
      f"node {self.node_id!r} already runs {running} requests, its limit (--max-requests); try again shortly",
      self.retry_after_s(predicted_speed(plan), open_requests),
    )

  def owed_s(self, speed: tuple[float, float] | None, open_requests: Collection[OpenRequest], *more: tuple[float, int]) -> float:
    """drain_s of the requests in flight (and `more`) at `speed` (TPOT, throughput); 0 when no speed is predicted."""
    if speed is None:
      return 0.0
    owed = [(0.0 if p.tokens else p.prefill_s, max(0, p.budget - len(p.tokens))) for p in open_requests]
    return drain_s(owed + list(more), *speed)

  def retry_after_s(self, speed: tuple[float, float] | None, open_requests: Collection[OpenRequest]) -> int:
    """Whole seconds until the requests in flight are predicted to be answered: at least 1, at most the request timeout."""
    return max(1, min(math.ceil(self.owed_s(speed, open_requests)), math.ceil(self.request_timeout)))
