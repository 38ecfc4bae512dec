"""What every engine shares: each request's state keyed by request AND shard, several shards held side by side, and checks that
make a lost or misrouted request fail loudly instead of silently restarting.

A node can be asked for a second layer range while requests run on the first (a node joined and the ring was re-planned; a
request came from an origin with another view of the cluster). Loading the new range must not touch the old one's requests:
both stay resident while memory allows; otherwise the new work waits until the requests holding the old range finish, and
`waiting` says so. A shard nobody uses is dropped when another is loaded.

A request's state (its KV cache) is made at its first step for the positions the step's `context` names (the plan's context),
at most the model's (`_dims`), so a node planned for a short context holds less; a step beyond them raises ValueError.

Every call names the position of its first input row. A request is new only at position 0; a call for a request this engine
does not hold at that shard and position (its state was dropped, it runs here under another shard, or a step was lost or
repeated) raises RequestStateError, which the node reports to the request's origin.

Subclasses supply the model-specific work, run in their worker via `_in_worker`: `_load_model`, `_new_cache`, `_forward`,
`_dims`, and `_shard_bytes` for the memory check.
"""

import asyncio
import logging
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from exo.base.shard import Shard
from exo.inference.inference_engine import InferenceEngine, Step, infer_one
from exo.inference.sampling import Sampling, sample_last

log = logging.getLogger(__name__)


class RequestStateError(RuntimeError):
  """A step for a request this engine cannot continue correctly; the message says why."""


@dataclass
class _State:
  position: int  # positions this shard has processed for the request
  cache: Any
  context: int  # positions the request may reach: what its cache was made for


@dataclass(frozen=True)
class ModelDims:
  vocab_size: int
  hidden_size: int
  context_length: int


class ShardedEngine(InferenceEngine):
  """`memory_limit_bytes`: how many bytes of shards may be resident at once (None: what the machine has available). `seed`: the
  engine's own generator, for a draw whose caller passes none (a node passes each request's own)."""

  def __init__(self, seed: int = 0, memory_limit_bytes: int | None = None):
    self._sampler = np.random.default_rng(seed)
    self.memory_limit_bytes = memory_limit_bytes
    self._models: dict[Shard, Any] = {}
    self._states: dict[tuple[str, Shard], _State] = {}
    self._loading: asyncio.Lock | None = None
    self._finished_event: asyncio.Event | None = None  # set when a request finishes (its shard may then be dropped)
    self._running: Counter[str] = Counter()  # steps in flight per request
    self._dropped: set[str] = set()  # requests finished while a step of theirs ran: that step must not bring their state back
    self.waiting: str | None = None  # why new work is waiting for memory, while it does

  # model-specific work, in the worker

  @abstractmethod
  async def _in_worker(self, fn, *args):
    """Run fn(*args) where this engine's computations run, and return its result."""

  @abstractmethod
  def _load_model(self, shard: Shard) -> Any:
    """The shard's weights, ready to run."""

  @abstractmethod
  def _new_cache(self, model: Any, shard: Shard, context: int) -> Any:
    """Empty per-request state (a KV cache) for the shard, for `context` positions (at most the model's)."""

  @abstractmethod
  def _forward(self, model: Any, cache: Any, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
    """Run the shard over x at positions position.. (token ids (P,) int64 on the first shard, else hidden states (P, hidden)
    float32), updating `cache`. Returns (1, P, hidden) hidden states, or (1, P, vocab) logits on the last shard, float32."""

  @abstractmethod
  def _dims(self, model: Any) -> ModelDims:
    pass

  def _shard_bytes(self, shard: Shard) -> int:
    """Bytes the shard's weights take once loaded (0: unknown, always fits)."""
    return 0

  def _unload_model(self, model: Any) -> None:
    """Free what _load_model allocated (in the worker; by default the garbage collector does)."""

  # the engine interface

  async def sample(
    self, logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, rng: np.random.Generator | None = None
  ) -> int:
    return sample_last(logits, Sampling(temperature, top_p, top_k), self._sampler if rng is None else rng)

  async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray, position: int = 0) -> np.ndarray:
    """Token ids ((P,) or (1, P) ints) on the first shard, else hidden states (1, P, hidden_size). Returns hidden states
    (1, P, hidden_size) float32, or logits (1, P, vocab_size) float32 on the last shard. `position`: that of the first row."""
    return await infer_one(self, request_id, shard, input_data, position)

  async def infer_batch(self, shard: Shard, steps: list[Step]) -> list[np.ndarray | Exception]:
    """The steps that can run (see `_check_state`; one per request) run as one `_forward_batch` call; each step gets its output
    or its exception. A request's state is stored only once its step succeeded."""
    outputs: list[np.ndarray | Exception | None] = [None] * len(steps)
    placed: list[tuple[int, Step, _State | None]] = []
    for i, step in enumerate(steps):
      try:
        if any(other.request_id == step.request_id for _, other, _ in placed):
          raise RequestStateError(f"request {step.request_id!r} has two steps in one batch")
        placed.append((i, step, self._check_state(step.request_id, shard, step.position)))
      except RequestStateError as e:
        outputs[i] = e
    try:
      model = await self._resident(shard) if placed else None
      dims = self._dims(model) if placed else None
    except Exception as e:
      return [e if out is None else out for out in outputs]
    ready: list[tuple[int, Step, _State | None, np.ndarray]] = []
    for i, step, state in placed:
      try:
        context = state.context if state else request_context(dims, step.context)
        ready.append((i, step, state, self._validated(shard, dims, step.input_data, step.position, context)))
      except ValueError as e:
        outputs[i] = e
    if not ready:
      return outputs
    ids = [step.request_id for _, step, _, _ in ready]
    self._running.update(ids)
    try:
      states = []
      for _, step, state, _ in ready:
        context = request_context(dims, step.context)
        states.append(state or _State(0, await self._in_worker(self._new_cache, model, shard, context), context))
      xs, positions = [x for *_, x in ready], [step.position for _, step, _, _ in ready]
      last_only = [step.last_only for _, step, _, _ in ready]
      results = await self._in_worker(self._forward_steps, model, [s.cache for s in states], shard, xs, positions, last_only)
    except Exception as e:
      states, results = [None] * len(ready), [e] * len(ready)
    finally:
      self._running.subtract(ids)
    for (i, step, _, x), state, out in zip(ready, states, results):
      outputs[i] = out
      if state is not None and step.request_id not in self._dropped:  # one finished while its step ran is not brought back
        state.position = step.position + len(x)
        self._states[(step.request_id, shard)] = state
    for request_id in ids:
      if self._running[request_id] <= 0:
        del self._running[request_id]
        self._dropped.discard(request_id)
    return outputs

  def _check_state(self, request_id: str, shard: Shard, position: int) -> _State | None:
    """The request's state at this shard (None: a new request, at position 0), or RequestStateError if a step for it at
    `position` cannot continue it correctly."""
    state = self._states.get((request_id, shard))
    if state is None:
      elsewhere = sorted(f"{s.start_layer}-{s.end_layer}" for r, s in self._states if r == request_id)
      if elsewhere:
        raise RequestStateError(
          f"request {request_id!r} runs on layers {', '.join(elsewhere)} of this node, not on {shard.start_layer}-{shard.end_layer}"
        )
      if position != 0:
        raise RequestStateError(
          f"request {request_id!r} is unknown at layers {shard.start_layer}-{shard.end_layer} of this node (its state is gone), "
          f"so it cannot continue at position {position}"
        )
    elif state.position != position:
      raise RequestStateError(f"request {request_id!r} is at position {state.position} on this node, but a step for position {position} arrived")
    return state

  def _forward_steps(
    self, model: Any, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int], last_only: list[bool]
  ) -> list[np.ndarray]:
    """_forward_batch, each output cut to its last row where last_only says so (Step.last_only). An engine that can skip the
    other rows' work overrides this."""
    outputs = self._forward_batch(model, caches, shard, xs, positions)
    return [out[:, -1:] if last else out for out, last in zip(outputs, last_only)]

  def _forward_batch(self, model: Any, caches: list, shard: Shard, xs: list[np.ndarray], positions: list[int]) -> list[np.ndarray]:
    """Several requests' steps over the shard in one call: xs[i] is (P_i,) int64 token ids on the first shard, else (P_i, hidden)
    float32 hidden states, for the request whose per-request state (from _new_cache) is caches[i], at positions positions[i]..;
    returns each request's (1, P_i, hidden) hidden states, or (1, P_i, vocab) logits on the last shard, float32, updating each
    cache. By default one _forward each; an engine that batches overrides it."""
    return [self._forward(model, c, shard, x, p) for c, x, p in zip(caches, xs, positions)]

  async def finish_request(self, request_id: str) -> None:
    if self._running[request_id] > 0:
      self._dropped.add(request_id)
    for key in [k for k in self._states if k[0] == request_id]:
      state = self._states.pop(key)
      await self._in_worker(lambda s: None, state)  # after any queued step of the request; its arrays are freed in the worker
    if self._finished_event is not None:
      self._finished_event.set()

  def close(self) -> None:
    """Forget every request and shard (engines whose arrays must be freed in their worker do that first)."""
    self._states.clear()
    self._models.clear()

  def active_requests(self) -> set[str]:
    """Ids of the requests whose state this engine holds."""
    return {r for r, _ in self._states}

  def resident_shards(self) -> list[Shard]:
    return list(self._models)

  def held_bytes(self) -> int:
    """Bytes of the resident shards' weights, as the model file's figures give them."""
    return sum(self._shard_bytes(s) for s in self._models)

  async def load_shard(self, shard: Shard) -> None:
    """Make `shard` resident now rather than on its first step."""
    await self._resident(shard)

  async def hidden_size(self, shard: Shard) -> int:
    return self._dims(await self._resident(shard)).hidden_size

  async def unload_shard(self, shard: Shard) -> None:
    if shard in self._models and shard not in self._busy():
      await self._in_worker(self._unload_model, self._models.pop(shard))

  # residency

  def _busy(self) -> set[Shard]:
    return {s for _, s in self._states}

  def _fits(self, need: int) -> bool:
    if self.memory_limit_bytes is not None:
      return self.held_bytes() + need <= self.memory_limit_bytes
    return need <= psutil.virtual_memory().available

  async def _drop_idle(self, keep: Shard) -> None:
    for shard in [s for s in self._models if s != keep and s not in self._busy()]:
      await self._in_worker(self._unload_model, self._models.pop(shard))

  async def _resident(self, shard: Shard) -> Any:
    if shard in self._models:
      return self._models[shard]
    if self._loading is None:
      self._loading, self._finished_event = asyncio.Lock(), asyncio.Event()
    async with self._loading:
      if shard in self._models:
        return self._models[shard]
      await self._drop_idle(shard)
      need = self._shard_bytes(shard)
      while not self._fits(need) and self._busy():
        busy = ", ".join(sorted(f"{s.start_layer}-{s.end_layer}" for s in self._busy()))
        self.waiting = f"layers {shard.start_layer}-{shard.end_layer} wait for the requests on layers {busy} to finish: both do not fit in memory"
        log.warning(self.waiting)
        self._finished_event.clear()
        await self._finished_event.wait()
        await self._drop_idle(shard)
      self.waiting = None
      self._models[shard] = await self._in_worker(self._load_model, shard)
      return self._models[shard]

  @staticmethod
  def _validated(shard: Shard, dims: ModelDims, input_data: np.ndarray, position: int, context: int) -> np.ndarray:
    x = np.asarray(input_data)
    if shard.is_first_layer():
      if not np.issubdtype(x.dtype, np.integer) or x.ndim not in (1, 2) or x.size == 0 or (x.ndim == 2 and x.shape[0] != 1):
        raise ValueError(f"the first shard takes (P,) or (1, P) token ids, got {x.dtype} {x.shape}")
      x = x.reshape(-1).astype(np.int64)
      if x.min() < 0 or x.max() >= dims.vocab_size:
        raise ValueError(f"token ids must lie in [0, {dims.vocab_size}), got {x.min()}..{x.max()}")
    else:
      if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] == 0 or x.shape[2] != dims.hidden_size:
        raise ValueError(f"shard {shard} takes hidden states (1, P, {dims.hidden_size}), got {x.shape}")
      x = x[0].astype(np.float32)
    if position + len(x) > context:
      limit = "the model's context length" if context == dims.context_length else "its context (the plan's)"
      raise ValueError(f"the request would reach {position + len(x)} positions; expected at most {limit}, {context}")
    return x


def request_context(dims: ModelDims, context: int) -> int:
  """The positions a request asking for `context` (0: the model's) gets: at most the model's context length."""
  return min(context, dims.context_length) if context > 0 else dims.context_length
