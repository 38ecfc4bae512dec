"""The seam between the ring and a model: an engine runs one shard's layers for one request at a time, keeping that request's
state (KV cache, position) on the node that owns the layers until the request is finished."""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from exo.base.shard import Shard


def positions_in(input_data: np.ndarray) -> int:
  """Positions (tokens) in an infer_tensor input: token ids (P,) or (1, P), or hidden states (..., P, hidden)."""
  shape = np.shape(input_data)
  if np.issubdtype(np.asarray(input_data).dtype, np.integer) or len(shape) < 2:
    return int(shape[-1]) if shape else 1
  return int(shape[-2])


@dataclass(frozen=True, eq=False)
class Step:
  """One request's input to a shard: token ids or hidden states (see `infer_tensor`), at the position of its first row. `context`:
  the positions the request may reach, for which its KV cache is allocated at its first step (the plan's context; 0: the
  engine's own, the model's capped at MAX_CONTEXT). `last_only`: only the last position's output is wanted (what a sampler reads
  of the last shard's logits), so the engine returns (1, 1, width) and may skip computing the others'."""

  request_id: str
  input_data: np.ndarray
  position: int = 0
  context: int = 0
  last_only: bool = False


class InferenceEngine(ABC):
  max_batch = 1  # steps of different requests the engine runs as one computation (a node's default largest batch)
  prompt_rows = 0  # prompt rows of different requests one call may hold beside decode steps (0: a prompt chunk runs alone)

  @abstractmethod
  async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
    """Token ids (1-D int64) of the prompt, chat template applied."""

  @abstractmethod
  async def decode(self, shard: Shard, tokens: list[int]) -> str:
    pass

  @abstractmethod
  async def apply_chat_template(self, shard: Shard, messages: list[dict]) -> str:
    """The prompt text for a chat ([{"role": ..., "content": ...}]) in the model's own template, ready for `encode`."""

  @abstractmethod
  async def sample(
    self, logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, rng: np.random.Generator | None = None
  ) -> int:
    """The next token from the last position's logits: greedy at temperature 0, else one draw as `sampling.sample_last` makes it,
    from `rng` (a request's own generator) or, if None, from the engine's."""

  @abstractmethod
  async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray, position: int = 0) -> np.ndarray:
    """Run the shard's layers. Input: token ids on the first shard, else the previous shard's hidden states. Output: hidden
    states, or logits on the last shard. Called first with the whole prompt at position 0, then with one new token at a time
    at the position of its first row; a step this engine cannot place (unknown request, wrong position) raises."""

  async def infer_batch(self, shard: Shard, steps: list[Step]) -> list[np.ndarray | Exception]:
    """`infer_tensor` for several requests at once (each with its own state and position): each step's output, or the exception
    it raised (the others still run). An engine that can run them as one computation overrides this; by default, in turn."""
    outputs: list[np.ndarray | Exception] = []
    for step in steps:
      try:
        out = await self.infer_tensor(step.request_id, shard, step.input_data, step.position)
        outputs.append(out[:, -1:] if step.last_only else out)
      except Exception as e:
        outputs.append(e)
    return outputs

  async def context_length(self, shard: Shard) -> int | None:
    """Positions one request can hold on this engine, prompt and answer together; None if the engine cannot say."""
    return None

  @abstractmethod
  def eos_token_ids(self, shard: Shard) -> set[int]:
    pass

  @abstractmethod
  async def hidden_size(self, shard: Shard) -> int:
    """The width of the hidden states the shard's layers take and give (loading the shard if it is not resident)."""

  @abstractmethod
  async def unload_shard(self, shard: Shard) -> None:
    """Drop the shard's weights now if they are resident and no request uses them."""

  @abstractmethod
  async def finish_request(self, request_id: str) -> None:
    """Release the request's state (KV cache, position)."""

  @abstractmethod
  def close(self) -> None:
    """Release what the engine holds (weights, worker threads) once its queued work is done; called once, when it is no longer used."""


async def infer_one(engine: InferenceEngine, request_id: str, shard: Shard, input_data: np.ndarray, position: int) -> np.ndarray:
  """`engine.infer_batch` of one step, raising its exception: `infer_tensor` for an engine whose work is `infer_batch`."""
  [out] = await engine.infer_batch(shard, [Step(request_id, input_data, position)])
  if isinstance(out, Exception):
    raise out
  return out
