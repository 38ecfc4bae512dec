"""The text side of the models a node serves, through its engine: prompts to tokens, tokens to text, chat templates and each
model's end-of-sequence tokens (the tokenizer is per model: any shard of it will do)."""

import asyncio

import numpy as np

from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.inference.inference_engine import InferenceEngine

__all__ = ["ModelText", "whole_model"]


def whole_model(model: ModelSpec) -> Shard:
  return Shard(model.id, 0, model.n_layers - 1, model.n_layers)


class ModelText:
  def __init__(self, engine: InferenceEngine):
    self.engine = engine
    self._eos: dict[str, set[int]] = {}  # by model id: its end-of-sequence tokens

  async def eos_token_ids(self, shard: Shard) -> set[int]:
    """The model's end-of-sequence tokens; the first call builds its tokenizer, off the event loop."""
    if shard.model_id not in self._eos:
      self._eos[shard.model_id] = await asyncio.to_thread(self.engine.eos_token_ids, shard)
    return self._eos[shard.model_id]

  async def encode(self, model: ModelSpec, text: str) -> np.ndarray:
    return await self.engine.encode(whole_model(model), text)

  async def decode(self, model: ModelSpec, tokens: list[int]) -> str:
    return await self.engine.decode(whole_model(model), tokens)

  async def answer_text(self, model: ModelSpec, tokens: list[int]) -> tuple[str, bool]:
    """The text of an answer's tokens, without the end-of-sequence token that may end them, and whether one did."""
    ended = bool(tokens) and tokens[-1] in await self.eos_token_ids(whole_model(model))
    return await self.decode(model, tokens[:-1] if ended else tokens), ended

  async def apply_chat_template(self, model: ModelSpec, messages: list[dict]) -> str:
    return await self.engine.apply_chat_template(whole_model(model), messages)

  async def context_length(self, model: ModelSpec) -> int | None:
    """The context the engine's model file allows (None: unknown)."""
    return await self.engine.context_length(whole_model(model))

  def engine_waiting(self) -> str | None:
    """What the engine waits for now (memory, a download), if it says."""
    return getattr(self.engine, "waiting", None)
