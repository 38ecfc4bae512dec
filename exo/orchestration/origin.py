"""The node that receives a request is its origin: it admits it (plans it, sets its token budget), sends the prompt to the
first stage, takes the last stage's tokens until the end of sequence, a stop string, the budget or the deadline, watches the
ring when tokens stop coming, and tells the ring when the request is over."""

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import Callable

from exo.base.errors import BadInput
from exo.base.model_spec import ModelSpec
from exo.inference.sampling import GREEDY, Sampling
from exo.networking.request_context import RequestContext, RingPlan
from exo.orchestration.admission import AdmissionPolicy, OpenRequest, answer_budget
from exo.orchestration.cluster_view import ClusterView
from exo.orchestration.messenger import Messenger
from exo.orchestration.model_text import ModelText
from exo.orchestration.planner_driver import PlannerDriver
from exo.orchestration.requests import Admission, Generation, LastRequest, RequestFailed
from exo.orchestration.stop_strings import visible_text

log = logging.getLogger(__name__)
WATCH_S = 2.0  # the origin health-checks a request's ring when no token has come for this long
LOAD_WINDOW_S = 10.0  # the tokens/s a node reports is over this many seconds

__all__ = ["LOAD_WINDOW_S", "Origin", "WATCH_S"]


class Origin:
  def __init__(
    self,
    cluster: ClusterView,
    planner: PlannerDriver,
    policy: AdmissionPolicy,
    text: ModelText,
    messenger: Messenger,
    running: Callable[[], int],
    max_generate_tokens: int,
  ):
    self.cluster, self.planner, self.policy, self.text, self.messenger = cluster, planner, policy, text, messenger
    self.running = running  # the requests running on this node now, as origin or stage
    self.max_generate_tokens = max_generate_tokens
    self.requests: dict[str, OpenRequest] = {}  # by id, oldest first
    self.last_generation: Generation | None = None  # the last request that finished
    self.last_request: LastRequest | None = None  # the last request, whatever its outcome
    self._delivered: deque[tuple[float, int]] = deque()  # (time, tokens) of the last LOAD_WINDOW_S seconds

  async def admit(self, prompt: str, model: ModelSpec, max_tokens: int | None = None) -> Admission:
    """The plan a request runs on (planned now, which may raise ClusterCannotServe) and how many tokens its answer may have
    (answer_budget: the client's `max_tokens`, else what the planned context leaves after the prompt, at most
    --max-generate-tokens), if this node takes it now; it holds its place among the node's requests from now on (`generate`
    runs it, `release` frees it). BadInput if the prompt and `max_tokens` do not fit in the planned context (or the engine's,
    if shorter); Busy as AdmissionPolicy.prefill_s says."""
    if self.running() >= self.policy.max_requests:  # a full node refuses before any work
      raise self.policy.full(self.planner.current_plan, self.running(), self.requests.values())
    prompt_tokens, engine_context = len(await self.text.encode(model, prompt)), await self.text.context_length(model)
    plan = await asyncio.to_thread(self.planner.plan, model)  # the search takes milliseconds to a few seconds
    context, what = plan.context_tokens, "the planned context"
    if engine_context is not None and engine_context < context:
      context, what = engine_context, f"{model.id}'s context"
    budget = answer_budget(prompt_tokens, max_tokens, context, self.max_generate_tokens, what)
    # no await from this check to the place taken: no other request can pass between
    prefill_s = self.policy.prefill_s(plan, prompt_tokens, budget, self.running(), self.requests.values())
    request_id = str(uuid.uuid4())
    self.open(request_id, budget=budget, prefill_s=prefill_s, deadline=time.monotonic() + self.policy.request_timeout)
    return Admission(plan, budget, request_id, prompt_tokens)

  def open(self, request_id: str, **fields) -> OpenRequest:
    """Count `request_id` among the requests this node is the origin of (OpenRequest's `fields`); its future ends it."""
    request = self.requests[request_id] = OpenRequest(asyncio.get_running_loop().create_future(), **fields)
    return request

  def release(self, admission: Admission | None) -> None:
    """Free the place of an admitted request that `generate` never ran (a no-op for None, or one it runs or ran)."""
    if admission is not None and admission.request_id in self.requests and not self.requests[admission.request_id].running:
      del self.requests[admission.request_id]

  async def generate(
    self,
    prompt: str,
    model: ModelSpec,
    max_tokens: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    sampling: Sampling = GREEDY,
    stop: tuple[str, ...] = (),
    admission: Admission | None = None,
  ) -> Generation:
    """Admit the request (or run `admission`, what `admit` gave for this prompt and model), send the prompt to the first stage,
    and wait for the last stage's tokens (chosen as `sampling` says) until EOS, a stop string in the text (the text ends before
    it), the token budget (`admit`'s) or the deadline. Refused first as `admit` says."""
    started = time.perf_counter()
    if "" in stop:
      self.release(admission)
      raise BadInput("a stop string must not be empty")
    admission = admission or await self.admit(prompt, model, max_tokens)
    request = self.requests.get(admission.request_id)
    if request is None:
      raise RequestFailed(f"request {admission.request_id} was released before it ran")
    request.on_token, request.running = on_token, True
    watch = asyncio.create_task(self._watch_for_stop(request, model, stop)) if stop else None
    ring, outcome, error = None, "cancelled", ""
    try:
      ring = RingPlan.from_node_shards(admission.plan.node_shards(), admission.plan.context_tokens)
      tokens = await self._run(
        request, ring, RequestContext(admission.request_id, self.cluster.node_id, ring, admission.max_tokens, sampling=sampling), prompt
      )
      answer, ended = await self.text.answer_text(model, tokens)
      text, stopped = visible_text(answer, stop, final=True)
      outcome = "stop" if ended or stopped else "length"
    except Exception as e:
      outcome, error = "failed", str(e)
      raise
    finally:
      if watch is not None:
        watch.cancel()
      self.requests.pop(admission.request_id, None)
      self._record(admission, model, request.tokens if outcome in ("cancelled", "failed") else tokens, time.perf_counter() - started, outcome, error)
      if ring is not None:
        await self.messenger.broadcast_finish(ring, admission.request_id)
    self.last_generation = Generation(admission.request_id, tokens, text, admission.plan, self.last_request.elapsed_s, outcome)
    return self.last_generation

  def _record(self, admission: Admission, model: ModelSpec, tokens: list[int], elapsed_s: float, outcome: str, error: str) -> None:
    """The request as the node's last: its outcome, its measured time and what its plan predicts for its prompt and answer."""
    predicted = self.planner.predict_for(admission.plan, admission.prompt_tokens) if admission.prompt_tokens else None
    ring = [node_id for node_id, _ in admission.plan.node_shards()]
    ttft, tpot = (None, None) if predicted is None else (predicted.ttft_s, predicted.tpot_s)
    self.last_request = LastRequest(admission.request_id, model.id, ring, admission.prompt_tokens, len(tokens), elapsed_s, outcome, error, ttft, tpot)

  async def _run(self, request: OpenRequest, ring: RingPlan, context: RequestContext, prompt: str) -> list[int]:
    """Send the prompt round `ring` and wait for its tokens."""
    request.senders = frozenset(ring.node_ids())
    try:
      await self.messenger.deliver(ring.stages[0].node_id, ring.shard(0), prompt, context)
    except RequestFailed:
      await self.cluster.check(ring.node_ids())  # leave the first stage out of plans while it does not answer
      raise
    log.info("request %s: prompt sent to %s, ring %s", context.request_id, ring.stages[0].node_id, " -> ".join(ring.node_ids()))
    return await self._await_tokens(request, ring, context.request_id)

  async def _watch_for_stop(self, request: OpenRequest, model: ModelSpec, stop: tuple[str, ...]) -> None:
    """End the request with the tokens so far once a stop string is in their text (the ring is told as on any finish)."""
    try:
      while not request.future.done():
        await request.arrived.wait()
        request.arrived.clear()
        tokens = list(request.tokens)
        text, _ = await self.text.answer_text(model, tokens)
        if visible_text(text, stop)[1] and not request.future.done():
          request.future.set_result(tokens)
    except Exception as e:  # a tokenizer that fails: the request fails with it rather than run past its stop strings
      if not request.future.done():
        request.future.set_exception(e)

  async def _await_tokens(self, request: OpenRequest, ring: RingPlan, request_id: str) -> list[int]:
    """The request's tokens once the last stage reports it finished. When no token has come for WATCH_S seconds, the ring's
    nodes are health-checked: one that does not answer fails the request at once, naming it, rather than at the deadline (the
    one set at its admission)."""
    path = " -> ".join(ring.node_ids())
    while True:
      now = time.monotonic()
      if now >= request.deadline:
        silent = await self.cluster.check(ring.node_ids())
        because = f": {', '.join(repr(n) for n in silent)} did not answer a health check" if silent else ""
        raise RequestFailed(f"request {request_id} timed out after {self.policy.request_timeout:g} s on ring {path}{because}")
      quiet = now - request.last_progress
      if quiet >= WATCH_S:
        request.last_progress = now  # checked: the next check after another WATCH_S of silence
        silent = await self.cluster.check(ring.node_ids())
        if silent:
          raise RequestFailed(f"request {request_id} stalled on ring {path}: {', '.join(repr(n) for n in silent)} did not answer a health check")
        continue
      try:
        return await asyncio.wait_for(asyncio.shield(request.future), min(WATCH_S - quiet, request.deadline - now))
      except asyncio.TimeoutError:
        pass
      except RequestFailed:
        await self.cluster.check(ring.node_ids())  # a node reported the failure: leave out of plans those that no longer answer
        raise

  def process_result(self, request_id: str, tokens: list[int], is_finished: bool, error: str, sender: str | None = None) -> None:
    """Tokens (or a failure) of a request this node is the origin of, from `sender` (None: this node); ignored from a node that
    is not on the request's ring."""
    request = self.requests.get(request_id)
    if request is None or request.future.done():
      return
    if sender is not None and sender not in request.senders:
      log.warning("ignoring a result for request %s from %r, which is not on its ring", request_id, sender)
      return
    if error:
      request.future.set_exception(RequestFailed(error))
      return
    if not is_finished and len(tokens) <= len(request.tokens):
      return  # a report resent, or overtaken by the next one
    if len(tokens) > len(request.tokens):
      request.last_progress = time.monotonic()
      self._delivered.append((request.last_progress, len(tokens) - len(request.tokens)))
    request.tokens = list(tokens)
    request.arrived.set()
    if request.on_token:
      request.on_token(request.tokens)
    if is_finished:
      request.future.set_result(request.tokens)

  def tokens_per_s(self) -> float:
    """The tokens per second this node's requests received over the last LOAD_WINDOW_S seconds."""
    now = time.monotonic()
    while self._delivered and self._delivered[0][0] < now - LOAD_WINDOW_S:
      self._delivered.popleft()
    return sum(n for _, n in self._delivered) / LOAD_WINDOW_S
