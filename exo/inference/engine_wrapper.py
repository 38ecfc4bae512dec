"""An engine that runs another one: every call goes to `inner`, so a wrapper (pacing, slowing down) overrides only what it changes
(a single step is a batch of one, so a wrapper that changes how steps run overrides `infer_batch` alone)."""

import numpy as np

from exo.base.shard import Shard
from exo.inference.inference_engine import InferenceEngine, Step, infer_one


class EngineWrapper(InferenceEngine):
  def __init__(self, inner: InferenceEngine):
    self.inner = inner

  @property
  def max_batch(self) -> int:
    return self.inner.max_batch

  @property
  def prompt_rows(self) -> int:
    return self.inner.prompt_rows

  async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
    return await self.inner.encode(shard, prompt)

  async def decode(self, shard: Shard, tokens: list[int]) -> str:
    return await self.inner.decode(shard, tokens)

  async def apply_chat_template(self, shard: Shard, messages: list[dict]) -> str:
    return await self.inner.apply_chat_template(shard, messages)

  async def sample(
    self, logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, rng: np.random.Generator | None = None
  ) -> int:
    return await self.inner.sample(logits, temperature, top_p, top_k, rng)

  async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray, position: int = 0) -> np.ndarray:
    return await infer_one(self, request_id, shard, input_data, position)

  async def infer_batch(self, shard: Shard, steps: list[Step]) -> list[np.ndarray | Exception]:
    return await self.inner.infer_batch(shard, steps)

  async def context_length(self, shard: Shard) -> int | None:
    return await self.inner.context_length(shard)

  def eos_token_ids(self, shard: Shard) -> set[int]:
    return self.inner.eos_token_ids(shard)

  async def hidden_size(self, shard: Shard) -> int:
    return await self.inner.hidden_size(shard)

  async def unload_shard(self, shard: Shard) -> None:
    await self.inner.unload_shard(shard)

  async def finish_request(self, request_id: str) -> None:
    await self.inner.finish_request(request_id)

  def close(self) -> None:
    self.inner.close()
