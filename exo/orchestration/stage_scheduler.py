"""Which engine call a node runs next: continuous batching of decode steps, and prompts in chunks between them.

Every step a node's stage must run (a request's prompt, or its next token's hidden state) waits here. One loop per shard runs
the engine, one call at a time:
- the decode steps (one position each) waiting run as ONE call of up to the shard's batch requests, each with its own KV cache
  and position; steps that arrive while a call runs join the next one. The shard's batch is `max_batch`, lowered to the
  requests whose KV cache fits beside the shard in the node's memory (`batch_limit`);
- at the ring's first stage (the shard that takes token ids) the decoding requests are regrouped each round of the ring into
  micro-batches of G = min(batch, ceil(D / k)) for D requests on a ring of k stages, so that every stage has one to run
  (a single batch would leave all stages but one idle): fewer than G steps wait (up to a round) while running them now would
  leave more requests than the round's remaining calls can hold, so the D requests go round in ceil(D / G) micro-batches
  rather than in fragments that each cost a call at every stage. Later stages run the groups as they come, waiting up to half
  a decode call for a group's stragglers;
- where the engine runs prompt rows and decode steps of different requests in one call (`prompt_rows` > 0, as vLLM's chunked
  prefill does), a call takes the prompt chunks waiting, shortest first, up to `prompt_rows` rows, and every decode step waiting
  rides along: eight short prompts cost two or three calls, and running requests keep producing tokens while prompts are read.
  Otherwise:
- a prompt runs in chunks of at most `chunk_tokens` positions, one chunk per call. The prompt with the fewest positions left
  goes first (a short request is not stuck behind a long one). While requests decode here, prompts longer than a chunk get
  at most `prompt_share` of the stage's time (a chunk that took C seconds is followed by C (1 - share) / share seconds in which no
  chunk starts), unless a chunk would end before the decoders' next steps come back round the ring; and a chunk runs only
  after every `decodes_per_chunk` decode calls or while the decode steps wait for company: running requests keep producing
  tokens while a long prompt is read, and the prompt still progresses.
A cancelled request's waiting steps fail at once; a call already running finishes, and its result is dropped by the caller.

Per call: O(waiting steps) to choose it.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from exo.base.shard import Shard
from exo.inference.inference_engine import Step, positions_in


class StepCancelled(Exception):
  """The request was cancelled (finished, abandoned) while its step waited."""


@dataclass(eq=False)
class _Waiting:
  shard: Shard
  step: Step
  remaining: int  # positions of the request's input not yet run, this chunk's included
  total: int  # positions of the request's whole input (its prompt, or 1 for a decode step)
  arrived: float  # when the step was enqueued, on the scheduler's clock
  stages: int  # of the request's ring
  done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

  @property
  def rows(self) -> int:
    return positions_in(self.step.input_data)

  @property
  def decode(self) -> bool:
    return self.rows == 1 and self.remaining == 1


@dataclass
class _Round:
  """At the ring's first stage: the decoding requests run since this round of the ring began, in how many calls."""

  served: set[str] = field(default_factory=set)
  calls: int = 0
  started: float = 0.0
  last_s: float = 0.0  # how long the previous round took (0: unknown)


RECENT_S = 1.0  # a request counts as decoding at a shard this long after its last step there
RunCall = Callable[[Shard, list[Step], bool], Awaitable[list]]  # (shard, steps, is a prompt chunk) -> each output or exception
Clock = Callable[[], float]  # seconds, never going back
Sleep = Callable[[float], Awaitable[None]]  # waits that many seconds of the clock


@dataclass(eq=False)
class _ShardQueue:
  """The steps waiting for one shard, and the loop that runs them."""

  regroups: bool  # the ring's first stage
  batch: int  # the most decode steps in one call
  stages: int = 1  # of the ring of the last step that came
  waiting: list[_Waiting] = field(default_factory=list)
  wake: asyncio.Event = field(default_factory=asyncio.Event)
  task: asyncio.Task | None = None
  decodes_since_chunk: int = 0
  recent: dict[str, float] = field(default_factory=dict)  # request -> when it last sent or ran a decode step here
  decode_s: float = 0.0  # how long the last decode call took
  prompts_wait_until: float = 0.0  # while requests decode here, no prompt chunk starts before this
  chunk_s: float = 0.0  # how long the last prompt chunk took
  away_s: float = 0.0  # how long a decoding request's next step took to come back after its last call here
  decoded_at: float = 0.0  # when the last decode call ended
  round: _Round = field(default_factory=_Round)

  def decoding(self, now: float) -> int:
    """Requests that sent or ran a decode step here (or the last chunk of their prompt) within the last RECENT_S seconds:
    those whose next decode steps are expected."""
    for request_id in [r for r, seen in self.recent.items() if now - seen > RECENT_S]:
      del self.recent[request_id]
    return len(self.recent)

  def group(self, now: float) -> int:
    """G: the decode steps of one micro-batch, min(batch, ceil(D / k)) for the D requests decoding here on a ring of k stages."""
    return max(1, min(self.batch, -(-self.decoding(now) // self.stages)))


class StageScheduler:
  """`run_call(shard, steps, chunk)` runs one engine call and returns, per step, its output or the exception it raised;
  `cancelled(request_id)` says whether a request is over (its steps are then not run). Its decisions read the time from `clock`
  and wait with `sleep` (the monotonic clock and asyncio.sleep; a test passes a clock it moves itself).

  Each shard the node runs has its own queue and loop: a call that waits inside the engine (a second layer range waiting for
  memory until the requests on the first finish) never holds up the other shard's calls, which those requests need."""

  def __init__(
    self,
    run_call: RunCall,
    cancelled: Callable[[str], bool],
    max_batch: int = 1,
    chunk_tokens: int = 64,
    decodes_per_chunk: int = 4,
    prompt_share: float = 0.5,
    *,
    batch_limit: Callable[[Shard, int], int | None] | None = None,
    prompt_rows: int = 0,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
  ):
    if max_batch < 1 or chunk_tokens < 1 or decodes_per_chunk < 1 or not 0 < prompt_share <= 1 or prompt_rows < 0:
      raise ValueError(
        f"max_batch, chunk_tokens and decodes_per_chunk must be >= 1, prompt_share in (0, 1] and prompt_rows >= 0, got {max_batch}, "
        f"{chunk_tokens}, {decodes_per_chunk}, {prompt_share}, {prompt_rows}"
      )
    self.run_call, self.cancelled, self.batch_limit = run_call, cancelled, batch_limit
    self.max_batch, self.decodes_per_chunk, self.prompt_rows = max_batch, decodes_per_chunk, prompt_rows
    self._chunk_tokens = chunk_tokens
    self.prompt_share = prompt_share
    self.clock, self.sleep = clock, sleep
    self._queues: dict[Shard, _ShardQueue] = {}
    self.calls = 0  # engine calls run so far
    self.batch_sizes: list[int] = []  # of the last decode calls, newest last (at most 100)
    self.decode_calls = self.decode_steps = 0  # decode calls run so far, and the requests' steps in them

  @property
  def chunk_tokens(self) -> int:
    """Positions of a prompt per call: `prompt_rows` where calls mix prompts (a call's prompt rows may all be one long
    prompt's), else `chunk_tokens`."""
    return self.prompt_rows or self._chunk_tokens

  @chunk_tokens.setter
  def chunk_tokens(self, tokens: int) -> None:
    self._chunk_tokens = tokens

  async def run(self, shard: Shard, step: Step, stages: int = 1) -> np.ndarray:
    """The output of `step` (of a request on a ring of `stages` stages) once it has run: for a prompt, its chunks' outputs
    joined on the positions axis, except on the last shard, where only the last position's logits are kept (all a sampler
    reads; a long prompt's would take gigabytes). Raises what the engine raised for it, or StepCancelled."""
    x = np.asarray(step.input_data)
    token_ids = x.ndim <= 2 and np.issubdtype(x.dtype, np.integer)
    rows = x.reshape(-1).shape[0] if token_ids else x.shape[-2]
    outputs = []
    for lo in range(0, rows, self.chunk_tokens):
      chunk = x.reshape(-1)[lo : lo + self.chunk_tokens] if token_ids else x[..., lo : lo + self.chunk_tokens, :]
      last = shard.is_last_layer()
      piece = Step(step.request_id, chunk, step.position + lo, step.context, last)
      out = await self._enqueue(_Waiting(shard, piece, rows - lo, rows, self.clock(), stages))
      outputs.append(out[:, -1:] if last else out)
    return outputs[-1] if shard.is_last_layer() or len(outputs) == 1 else np.concatenate(outputs, axis=1)

  def cancel(self, request_id: str) -> None:
    """Fail the request's waiting steps with StepCancelled (its later ones are refused: `cancelled` says so from now on)."""
    for queue in self._queues.values():
      queue.recent.pop(request_id, None)
      for waiting in [w for w in queue.waiting if w.step.request_id == request_id]:
        queue.waiting.remove(waiting)
        if not waiting.done.done():
          waiting.done.set_exception(StepCancelled(f"request {request_id} was cancelled"))

  def largest_batch(self) -> int:
    """The most decode steps one call of any shard here may hold (max_batch while no shard has run)."""
    return max((queue.batch for queue in self._queues.values()), default=self.max_batch)

  def _shard_batch(self, shard: Shard, context: int) -> int:
    held = self.batch_limit(shard, context) if self.batch_limit else None
    return self.max_batch if held is None else max(1, min(self.max_batch, held))

  def waiting_requests(self) -> int:
    return len({w.step.request_id for queue in self._queues.values() for w in queue.waiting})

  async def stop(self) -> None:
    queues, self._queues = list(self._queues.values()), {}
    for queue in queues:
      if queue.task is not None:
        queue.task.cancel()
    await asyncio.gather(*(q.task for q in queues if q.task is not None), return_exceptions=True)
    for waiting in [w for q in queues for w in q.waiting]:
      if not waiting.done.done():
        waiting.done.set_exception(StepCancelled("the node is stopping"))

  async def _enqueue(self, waiting: _Waiting) -> np.ndarray:
    if self.cancelled(waiting.step.request_id):
      raise StepCancelled(f"request {waiting.step.request_id} was cancelled")
    queue = self._queues.get(waiting.shard)
    batch = self._shard_batch(waiting.shard, waiting.step.context)
    if queue is None:
      queue = self._queues[waiting.shard] = _ShardQueue(regroups=waiting.shard.start_layer == 0, batch=batch)
      queue.task = asyncio.create_task(self._run_forever(waiting.shard, queue))
    queue.batch = min(queue.batch, batch)  # a request planned for a longer context leaves room for fewer
    queue.stages = waiting.stages
    queue.waiting.append(waiting)
    if waiting.decode:
      if waiting.step.request_id in queue.recent:
        queue.away_s = waiting.arrived - queue.recent[waiting.step.request_id]
      queue.recent[waiting.step.request_id] = waiting.arrived
    queue.wake.set()
    return await waiting.done

  def next_call(self, queue: _ShardQueue, now: float) -> tuple[list[_Waiting], bool] | None:
    """The steps of a shard's next engine call and whether it is a prompt chunk, or None while the waiting decode steps wait
    for company and no chunk waits (see the module docstring)."""
    decodes = [w for w in queue.waiting if w.decode]
    chunks = [w for w in queue.waiting if not w.decode]
    if chunks and self.prompt_rows:
      return self._mixed_call(queue, decodes, chunks, now), True
    due = self.decodes_due_at(queue, decodes, now) <= now
    shortest = min(chunks, key=lambda w: w.remaining, default=None)
    if (
      shortest is not None
      and (shortest.total <= self.chunk_tokens or self.prompts_due_at(queue, now) <= now)
      and (not due or queue.decodes_since_chunk >= self.decodes_per_chunk)
    ):
      queue.decodes_since_chunk = 0
      return [shortest], True
    if not due:
      return None
    queue.decodes_since_chunk += 1
    call = decodes[: queue.group(now) if queue.regroups else queue.batch]
    self._count_round(queue, call, now)
    return call, False

  def _mixed_call(self, queue: _ShardQueue, decodes: list[_Waiting], chunks: list[_Waiting], now: float) -> list[_Waiting]:
    """The prompt chunks waiting, shortest first, up to `prompt_rows` rows (at least one), and the decode steps waiting, up to
    the shard's batch. O(waiting steps log waiting steps)."""
    call, rows = [], 0
    for waiting in sorted(chunks, key=lambda w: w.remaining):
      if call and rows + waiting.rows > self.prompt_rows:
        break
      call.append(waiting)
      rows += waiting.rows
    riders = decodes[: queue.batch]
    self._count_round(queue, riders, now)
    return riders + call

  @staticmethod
  def _count_round(queue: _ShardQueue, call: list[_Waiting], now: float) -> None:
    """At the ring's first stage, count the call's decode steps in the round of the ring (a request coming round again begins a
    new one)."""
    if not queue.regroups or not call:
      return
    ids = {w.step.request_id for w in call}
    if ids & queue.round.served:
      queue.round = _Round(started=now, last_s=now - queue.round.started)
    elif not queue.round.served:
      queue.round.started = now
    queue.round.served |= ids
    queue.round.calls += 1

  def prompts_due_at(self, queue: _ShardQueue, now: float) -> float:
    """When a prompt chunk may run: at once while no request decodes here or while the decoders' next steps are away for longer
    than a chunk takes (a pipeline stage between rounds), else once the decode calls have had the rest of the stage's time
    since the last chunk (a chunk of C seconds is followed by C (1 - prompt_share) / prompt_share of them)."""
    if not queue.decoding(now) or queue.decoded_at + queue.away_s >= now + queue.chunk_s:
      return now  # no decoder, or a chunk ends before the decoders' next steps come back: it delays nobody
    return queue.prompts_wait_until

  def decodes_due_at(self, queue: _ShardQueue, decodes: list[_Waiting], now: float) -> float:
    """When the waiting decode steps should run (at or before `now`: at once). A micro-batch of G (queue.group) runs at once.
    Fewer wait for the steps they need: at a later stage, every request decoding here (its group's stragglers), for up to half
    a decode call; at the first stage, enough that the round's remaining calls, G each, hold its remaining requests, for up to
    a round. O(waiting steps + requests decoding here)."""
    if not decodes:
      return float("inf")
    group = queue.group(now)
    if len(decodes) >= group:
      return now
    decoding = queue.decoding(now)
    if queue.regroups:
      ids = {w.step.request_id for w in decodes}
      this_round = not ids & queue.round.served
      served = len(queue.round.served & queue.recent.keys()) if this_round else 0
      calls = queue.round.calls if this_round else 0
      groups = -(-decoding // group)
      needed = decoding - served - group * max(0, groups - calls - 1)
      patience = min(RECENT_S, max(queue.decode_s / 2, queue.round.last_s))
    else:
      needed, patience = decoding, queue.decode_s / 2
    if len(decodes) >= min(group, needed):
      return now
    return min(w.arrived for w in decodes) + patience

  async def _run_forever(self, shard: Shard, queue: _ShardQueue) -> None:
    while True:
      now = self.clock()
      choice = self.next_call(queue, now)
      if choice is None:
        queue.wake.clear()
        due = self.decodes_due_at(queue, [w for w in queue.waiting if w.decode], now)
        if any(not w.decode for w in queue.waiting):  # a long prompt held back by the time share
          due = min(due, self.prompts_due_at(queue, now))
        await self._wait(queue.wake, None if due == float("inf") else max(0.0, due - now))
        continue
      call, chunk = choice
      for waiting in call:
        queue.waiting.remove(waiting)
      self.calls += 1
      decoding = sum(w.decode for w in call)
      if decoding:
        self.batch_sizes = [*self.batch_sizes[-99:], decoding]
        self.decode_calls, self.decode_steps = self.decode_calls + 1, self.decode_steps + decoding
      started = self.clock()
      try:
        results = await self.run_call(shard, [w.step for w in call], chunk)
      except Exception as e:
        results = [e] * len(call)
      ended = self.clock()
      for waiting in call:  # decoding here: a request whose step or prompt's last chunk just ran (its decode steps come next)
        if waiting.remaining == waiting.rows and not self.cancelled(waiting.step.request_id):
          queue.recent[waiting.step.request_id] = ended
      if chunk:
        queue.chunk_s = ended - started
        queue.prompts_wait_until = ended + queue.chunk_s * (1 - self.prompt_share) / self.prompt_share
      else:
        queue.decode_s, queue.decoded_at = ended - started, ended
      for waiting, result in zip(call, results):
        if waiting.done.done():
          continue
        if isinstance(result, BaseException):
          waiting.done.set_exception(result)
        else:
          waiting.done.set_result(result)

  async def _wait(self, wake: asyncio.Event, timeout: float | None) -> None:
    """Until `wake` is set or, unless `timeout` is None, `timeout` seconds of the clock have passed."""
    if timeout is None:
      await wake.wait()
      return
    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self.sleep(timeout))]
    try:
      await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
      for wait in waits:
        wait.cancel()
