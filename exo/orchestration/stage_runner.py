"""A node's stages of other nodes' requests (and of its own): what it takes from whom, running a stage through the stage
scheduler, passing the result on (the hidden states to the next stage; at the last, a sampled token back to the first and the
tokens so far to the origin), and reporting a failure to the origin, through a peer if need be."""

import asyncio
import logging
from typing import Callable, Coroutine

import numpy as np

from exo.base.errors import BadInput, Busy
from exo.base.model_spec import MAX_CONTEXT, ModelSpec
from exo.base.models import MODELS
from exo.base.shard import Shard
from exo.inference.inference_engine import InferenceEngine, Step, positions_in
from exo.networking.membership import NotAllowed
from exo.networking.request_context import RequestContext
from exo.orchestration.admission import answer_budget
from exo.orchestration.messenger import Messenger
from exo.orchestration.model_text import ModelText
from exo.orchestration.recent_ids import RecentIds
from exo.orchestration.requests import RequestFailed
from exo.orchestration.served import ServedRequests
from exo.orchestration.stage_scheduler import StageScheduler, StepCancelled

log = logging.getLogger(__name__)

__all__ = ["StageRunner", "stage_rows"]


def stage_rows(shard: Shard, tensor: np.ndarray, request_id: str) -> int:
  """The positions in a stage's input from the wire; BadInput unless it is shaped as the stage takes it: token ids (P,) or (1, P)
  on the first, hidden states (1, P, width) on the others, with P >= 1."""
  ids = np.issubdtype(tensor.dtype, np.integer)
  if shard.is_first_layer():
    fits = ids and (tensor.ndim == 1 or (tensor.ndim == 2 and tensor.shape[0] == 1))
  else:
    fits = not ids and tensor.ndim == 3 and tensor.shape[0] == 1 and tensor.shape[2] > 0
  rows = positions_in(tensor) if fits else 0
  if rows < 1:
    want = "token ids (P,) or (1, P)" if shard.is_first_layer() else "hidden states (1, P, width)"
    raise BadInput(
      f"request {request_id}: layers {shard.start_layer}-{shard.end_layer} take {want} with P >= 1, got {tensor.dtype} {list(tensor.shape)}"
    )
  return rows


class StageRunner:
  def __init__(
    self,
    node_id: str,
    model: ModelSpec | None,
    text: ModelText,
    scheduler: StageScheduler,
    messenger: Messenger,
    served: ServedRequests,
    finished: RecentIds,
    originated: Callable[[str], bool],
    take: Callable[[RequestContext], None],
    spawn: Callable[[Coroutine], None],
  ):
    self.node_id, self.model, self.text, self.scheduler, self.messenger = node_id, model, text, scheduler, messenger
    self.served, self.finished = served, finished
    self.originated = originated  # whether this node is a request's origin (and admitted it)
    self.take = take  # count a request starting here among the node's requests; Busy beyond --max-requests
    self.spawn = spawn
    self._ring_tokens: dict[str, list[int]] = {}  # at the last stage: tokens generated so far per request
    self._generators: dict[str, np.random.Generator] = {}  # at the last stage: each sampled request's own, from its first token
    self._orphans: set[str] = set()  # at the last stage: requests whose origin could not be told a result; not continued

  @property
  def engine(self) -> InferenceEngine:
    return self.text.engine

  async def take_prompt(self, shard: Shard, prompt: str, context: RequestContext, sender: str) -> np.ndarray:
    """The prompt's tokens, if this node takes it from `sender` (and counts the request as running here): only from the request's
    origin, never one naming this node as origin (its own prompts never come over the wire: such a request skipped its
    admission), only for the ring's first stage, with the model's layer count, and only if the prompt and max_tokens fit in the
    planned context (and the engine's). NotAllowed, BadInput or Busy (--max-requests) otherwise, before any engine call."""
    request_id, origin = context.request_id, context.origin_node_id
    if origin == self.node_id:
      raise NotAllowed(f"request {request_id} names node {self.node_id!r} as its origin but did not come through its admission: refused")
    if sender != origin:
      raise NotAllowed(f"request {request_id}'s prompt came from {sender!r}, not from its origin {origin!r}: refused")
    if context.plan.index_of(shard, self.node_id) != 0 or context.position != 0:
      raise BadInput(
        f"request {request_id}: a prompt goes to the first stage of its ring at position 0, not to layers {shard.start_layer}-{shard.end_layer} of {self.node_id!r} at {context.position}"
      )
    self._check_layers(shard)
    tokens = await self.engine.encode(shard, prompt)
    context_tokens, what = await self._context_limit(shard, context.plan.context_tokens)
    answer_budget(len(tokens), context.max_tokens, context_tokens, context.max_tokens, what)
    self.take(context)
    return tokens

  async def take_tensor(self, shard: Shard, tensor: np.ndarray, context: RequestContext, sender: str) -> bool:
    """Whether this node runs `tensor` from `sender` (counting the request as running here): only from the stage before this one
    on the request's ring, with the model's layer count, shaped as this stage takes it and within the planned context (and the
    engine's); NotAllowed or BadInput otherwise. A request that would start here beyond --max-requests is failed (its origin is
    told) rather than refused, so that the other requests of the same message run."""
    request_id, ring = context.request_id, context.plan
    index = ring.index_of(shard, self.node_id)
    if index is None:
      raise BadInput(
        f"request {request_id}: node {self.node_id!r} was sent layers {shard.start_layer}-{shard.end_layer}, which its plan does not give it"
      )
    previous = ring.stages[index - 1].node_id  # the first stage takes each new token from the last
    if sender != previous:
      raise NotAllowed(f"request {request_id}'s input to {self.node_id!r} came from {sender!r}; only {previous!r}, the stage before, sends it")
    if context.origin_node_id == self.node_id and not self.originated(request_id):
      raise NotAllowed(f"request {request_id} names node {self.node_id!r} as its origin but did not come through its admission: refused")
    if index == 0 and context.position == 0:
      raise NotAllowed(f"request {request_id}: a request starts with its prompt, from its origin, not with token ids")
    self._check_layers(shard)
    rows = stage_rows(shard, tensor, request_id)
    context_tokens, what = await self._context_limit(shard, ring.context_tokens)
    if context.position + rows > context_tokens:
      raise BadInput(f"request {request_id} would reach position {context.position + rows}, beyond {what} of {context_tokens} tokens")
    if request_id not in self.served and context.position == 0:
      try:
        self.take(context)
      except Busy as e:
        self.spawn(self.fail(context, str(e)))
        return False
    self.served.track(context)
    return True

  def _check_layers(self, shard: Shard) -> None:
    """BadInput if the shard's model is one this node knows and has another number of layers (the wire bounds any model's)."""
    known = self.model if self.model is not None and shard.model_id == self.model.id else MODELS.get(shard.model_id)
    if known is not None and shard.n_layers != known.n_layers:
      raise BadInput(f"{shard.model_id} has {known.n_layers} layers; the request's plan says {shard.n_layers}")

  async def _context_limit(self, shard: Shard, planned: int) -> tuple[int, str]:
    """The positions a request planned for `planned` tokens of context (0: the model's) may reach on this node's engine, and
    what to call that limit."""
    engine = await self.engine.context_length(shard)
    if planned > 0 and (engine is None or planned <= engine):
      return planned, "the planned context"
    if engine is not None:
      return engine, f"{shard.model_id}'s context"
    return MAX_CONTEXT, "the default context"

  async def run(self, shard: Shard, context: RequestContext, prompt: str | None = None, tensor: np.ndarray | None = None) -> None:
    """Run this node's stage of the carried plan and pass the result on; any failure is reported to the requesting node."""
    ring = context.plan
    try:
      index = ring.index_of(shard, self.node_id)
      if index is None:
        raise RequestFailed(f"node {self.node_id!r} was sent layers {shard.start_layer}-{shard.end_layer}, which the request's plan does not give it")
      if prompt is not None:
        tensor = (await self.engine.encode(shard, prompt))[None, :]
      out = await self.scheduler.run(shard, Step(context.request_id, tensor, context.position, ring.context_tokens), len(ring.stages))
      if context.request_id in self.finished:
        return  # finished while its step ran
      if index < len(ring.stages) - 1:
        await self.messenger.deliver(ring.stages[index + 1].node_id, ring.shard(index + 1), out, context)
      else:
        await self._close_round(shard, context, out, positions_in(tensor))
    except StepCancelled:
      return  # the request is over: nobody waits for this step
    except asyncio.CancelledError:
      raise
    except Exception as e:
      await self.fail(context, str(e) if isinstance(e, RequestFailed) else f"node {self.node_id!r} failed: {type(e).__name__}: {e}")

  async def _close_round(self, shard: Shard, context: RequestContext, logits: np.ndarray, rows: int) -> None:
    """At the last stage: sample the next token, send it round to the first stage unless the request ends with it, and report the
    tokens so far to the origin."""
    token = await self._sample(logits, context)
    tokens = self._ring_tokens.setdefault(context.request_id, [])
    tokens.append(token)
    finished = token in await self.text.eos_token_ids(shard) or len(tokens) >= context.max_tokens
    # The next step goes round first, so the report to the origin is off the ring's critical path (one RPC less per token).
    if not finished and context.request_id not in self._orphans:
      ring = context.plan
      await self.messenger.deliver(ring.stages[0].node_id, ring.shard(0), np.array([[token]], dtype=np.int64), context.at(context.position + rows))
    try:
      await self.messenger.report(context, list(tokens), finished)
    except Exception:
      self._orphans.add(context.request_id)  # the origin is gone: stop going round for it
      raise

  async def fail(self, context: RequestContext, reason: str) -> None:
    """The request failed at this node: it is over here, and its origin is told why (through a peer if it cannot be reached)."""
    log.warning("request %s failed at %s: %s", context.request_id, self.node_id, reason)
    self.finish(context.request_id)
    try:
      await self.messenger.report(context, [], True, reason)
    except Exception as report_error:
      log.warning(
        "could not report the failure of request %s to %s: %s; asking its peers to", context.request_id, context.origin_node_id, report_error
      )
      await self.messenger.relay_failure(context, reason)

  async def _sample(self, logits: np.ndarray, context: RequestContext) -> int:
    """The request's next token. A sampled request draws from its own generator, made at its first token, so the same seed gives
    the same tokens whatever else runs on the node."""
    sampling = context.sampling
    if sampling.greedy:
      return await self.engine.sample(logits)
    if context.request_id not in self._generators:
      self._generators[context.request_id] = sampling.generator()
    rng = self._generators[context.request_id]
    return await self.engine.sample(logits, sampling.temperature, sampling.top_p, sampling.top_k, rng=rng)

  def finish(self, request_id: str) -> None:
    """The request is over: its waiting steps are dropped, its later messages ignored, and its state released."""
    self.finished.add(request_id)
    self.scheduler.cancel(request_id)
    self._ring_tokens.pop(request_id, None)
    self._generators.pop(request_id, None)
    self._orphans.discard(request_id)
    self.served.forget(request_id)
    self.spawn(self.engine.finish_request(request_id))

  def sampling_ids(self) -> set[str]:
    """The requests whose tokens this node samples, as their last stage, and keeps (a request over leaves none)."""
    return set(self._ring_tokens) | set(self._generators)
