"""A ShardedEngine over a model file found on this machine (exo.inference.model_files): its tokenizer and chat template, and
each shard's size as held, from the file's metadata, for the memory check."""

import asyncio
from abc import abstractmethod

import numpy as np

from exo.base.model_spec import MAX_CONTEXT
from exo.base.shard import Shard
from exo.inference.downloads import ensure_model
from exo.inference.heap import trim_heap
from exo.inference.hub_files import FileMirror
from exo.inference.llama_weights import load_config
from exo.inference.model_figures import shard_held_bytes
from exo.inference.model_files import locate_model
from exo.inference.model_sources import ENGINE_FORMATS
from exo.inference.sharded_engine import ShardedEngine
from exo.inference.tokenizer import Tokenizer, load_tokenizer


class ModelFileEngine(ShardedEngine):
  formats = ENGINE_FORMATS["tinygrad"]  # the formats it would rather download a model in, best first

  def __init__(self, seed: int = 0, memory_limit_bytes: int | None = None):
    super().__init__(seed, memory_limit_bytes)
    self._tokenizers: dict[str, Tokenizer] = {}
    self._sizes: dict[Shard, int] = {}
    self._contexts: dict[str, int] = {}
    self.mirror: FileMirror | None = None  # where files are asked for before the hub: the node's peers, once it runs

  @abstractmethod
  async def _in_worker(self, fn, *args):
    pass

  async def _fetch(self, model_id: str, shard: Shard | None = None) -> None:
    """Download what this node lacks of the model (exo.inference.downloads): with a shard, its weight files too; without, the
    config and tokenizer. A model already here costs a look at its files."""
    await asyncio.to_thread(ensure_model, model_id, shard, shard is not None, self.formats, mirror=self.mirror)

  async def _resident(self, shard: Shard):
    if shard not in self._models:
      await self._fetch(shard.model_id, shard)
    return await super()._resident(shard)

  def _tokenizer(self, model_id: str) -> Tokenizer:
    if model_id not in self._tokenizers:
      self._tokenizers[model_id] = load_tokenizer(locate_model(model_id))
      trim_heap()  # the vocabulary's Python values, parsed from the file and dropped
    return self._tokenizers[model_id]

  async def _tokenizer_async(self, model_id: str) -> Tokenizer:
    if model_id not in self._tokenizers:
      await self._fetch(model_id)
    return self._tokenizers.get(model_id) or await self._in_worker(self._tokenizer, model_id)

  async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
    return np.array((await self._tokenizer_async(shard.model_id)).encode(prompt), dtype=np.int64)

  async def decode(self, shard: Shard, tokens: list[int]) -> str:
    return (await self._tokenizer_async(shard.model_id)).decode([int(t) for t in tokens])

  async def apply_chat_template(self, shard: Shard, messages: list[dict]) -> str:
    return (await self._tokenizer_async(shard.model_id)).apply_chat_template(messages)

  async def context_length(self, shard: Shard) -> int:
    """The model's context, capped at MAX_CONTEXT (what the planner reserves KV cache for), from the file's metadata."""
    if shard.model_id not in self._contexts:
      await self._fetch(shard.model_id)
      config = await asyncio.to_thread(load_config, locate_model(shard.model_id))
      self._contexts[shard.model_id] = min(config.context_length, MAX_CONTEXT)
    return self._contexts[shard.model_id]

  def eos_token_ids(self, shard: Shard) -> set[int]:
    return set(self._tokenizer(shard.model_id).eos_token_ids)

  def _shard_bytes(self, shard: Shard) -> int:
    if shard not in self._sizes:
      self._sizes[shard] = shard_held_bytes(locate_model(shard.model_id), shard)
    return self._sizes[shard]
