"""A deterministic stand-in for a model, for tests and simulations: no weights, microseconds per call, and a real model's contract.

Tokens are UTF-8 bytes + 3 (0..2 reserved, 2 = EOS). The first shard embeds (token, position) into a small hidden vector; every
layer mixes each position with the running sum of the inputs it has seen so far for the request (kept on this node, standing in for
a KV cache, so outputs depend on the whole history); the last shard projects to logits that favour printable ASCII and put EOS on
top after a prompt-dependent 20..60 generated tokens (or exactly `eos_after`).

Layer l's arithmetic depends only on l, the position and layer l's own state, and hidden states are rounded to float32 after every
layer, so a model run as one shard or split over any number of engines gives bit-identical outputs.
"""

import zlib

import numpy as np

from exo.base.shard import Shard
from exo.inference.sharded_engine import ModelDims, ShardedEngine

EOS_TOKEN = 2
TOKEN_OFFSET = 3  # token = byte + 3
VOCAB_SIZE = 512
HIDDEN_SIZE = 8
CONTEXT_LENGTH = 1 << 20
EOS_MIN, EOS_SPAN = 20, 41  # default EOS after 20..60 generated tokens
_PRINTABLE = np.arange(32 + TOKEN_OFFSET, 127 + TOKEN_OFFSET)  # the tokens greedy decoding may produce besides EOS
_MASKED = -1e9


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([0xE40, *key])


class _Layer:
  def __init__(self, index: int):
    rng = _rng(1, index)
    self.w = rng.standard_normal((HIDDEN_SIZE, HIDDEN_SIZE)) / np.sqrt(HIDDEN_SIZE)
    self.u = rng.standard_normal((HIDDEN_SIZE, HIDDEN_SIZE)) / np.sqrt(HIDDEN_SIZE)
    self.bias = rng.standard_normal(HIDDEN_SIZE) * 0.1
    self.freq = rng.uniform(0.05, 1.0, HIDDEN_SIZE)

  def __call__(self, x: np.ndarray, positions: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: (P, H) float32 at `positions`; history: sum of this layer's inputs at earlier positions. Returns (output, new history)."""
    x64 = x.astype(np.float64)
    seen = history + np.cumsum(x64, axis=0)
    context = seen / (positions[:, None] + 1)
    y = np.tanh(x64 @ self.w + context @ self.u + self.bias + 0.3 * np.sin(positions[:, None] * self.freq))
    return y.astype(np.float32), seen[-1]


class _Request:
  def __init__(self):
    self.history: dict[int, np.ndarray] = {}  # layer -> running sum of its inputs
    self.prompt_length: int | None = None
    self.eos_at: int | None = None  # generated tokens before EOS


class DummyInferenceEngine(ShardedEngine):
  """`eos_after`: generate exactly that many tokens before EOS (a huge value: never); None: 20..60 depending on the prompt.
  `seed` drives sampling at temperature > 0. Request state and its checks are ShardedEngine's, as in the real engines."""

  def __init__(self, eos_after: int | None = None, seed: int = 0, memory_limit_bytes: int | None = None):
    if eos_after is not None and eos_after < 0:
      raise ValueError(f"eos_after must be >= 0 or None, got {eos_after!r}")
    super().__init__(seed, memory_limit_bytes)
    self.eos_after = eos_after
    self._layers: dict[int, _Layer] = {}
    rng = _rng(2)
    self._embed_freq = rng.uniform(0.01, 1.0, (2, HIDDEN_SIZE))
    self._embed_phase = rng.uniform(0, 2 * np.pi, HIDDEN_SIZE)
    self._unembed = rng.standard_normal((HIDDEN_SIZE, VOCAB_SIZE)) * 40
    self._unembed_phase = rng.uniform(0, 2 * np.pi, len(_PRINTABLE))

  async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
    return np.frombuffer(prompt.encode("utf-8"), dtype=np.uint8).astype(np.int64) + TOKEN_OFFSET

  async def decode(self, shard: Shard, tokens: list[int]) -> str:
    return bytes(t - TOKEN_OFFSET for t in tokens if TOKEN_OFFSET <= t < 256 + TOKEN_OFFSET).decode("utf-8", errors="replace")

  async def apply_chat_template(self, shard: Shard, messages: list[dict]) -> str:
    """No template: the turns' contents, one per line, end with an assistant cue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

  async def context_length(self, shard: Shard) -> int:
    return CONTEXT_LENGTH

  def eos_token_ids(self, shard: Shard) -> set[int]:
    return {EOS_TOKEN}

  # ShardedEngine's model-specific work, inline: microseconds

  async def _in_worker(self, fn, *args):
    return fn(*args)

  def _load_model(self, shard: Shard) -> None:
    return None

  def _new_cache(self, model: None, shard: Shard, context: int) -> _Request:
    return _Request()

  def _dims(self, model: None) -> ModelDims:
    return ModelDims(VOCAB_SIZE, HIDDEN_SIZE, CONTEXT_LENGTH)

  def _forward(self, model: None, request: _Request, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
    positions = np.arange(position, position + len(x))
    h = self._embed(x, positions) if shard.is_first_layer() else x
    for layer in range(shard.start_layer, shard.end_layer + 1):
      h, request.history[layer] = self._layer(layer)(h, positions, request.history.get(layer, np.zeros(HIDDEN_SIZE)))
    if request.prompt_length is None:
      request.prompt_length = len(h)
    if not shard.is_last_layer():
      return h[None]
    return self._logits(request, h, positions)[None]

  def _layer(self, index: int) -> _Layer:
    if index not in self._layers:
      self._layers[index] = _Layer(index)
    return self._layers[index]

  def _embed(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    angle = tokens[:, None] * self._embed_freq[0] + positions[:, None] * self._embed_freq[1] + self._embed_phase
    return np.sin(angle).astype(np.float32)

  def _logits(self, request: _Request, h: np.ndarray, positions: np.ndarray) -> np.ndarray:
    logits = np.full((len(h), VOCAB_SIZE), _MASKED)
    # a high-frequency projection: nearby hidden states still choose different tokens, so greedy text does not settle on a few
    logits[:, _PRINTABLE] = np.sin(h.astype(np.float64) @ self._unembed[:, _PRINTABLE] + self._unembed_phase)
    if request.eos_at is None:
      if self.eos_after is not None:
        request.eos_at = self.eos_after
      else:
        # the last prompt position's hidden state fingerprints the whole prompt
        request.eos_at = EOS_MIN + zlib.crc32(h[request.prompt_length - 1].tobytes()) % EOS_SPAN
    generated_before = positions - (request.prompt_length - 1)  # tokens generated before the one these logits choose
    logits[generated_before == request.eos_at, EOS_TOKEN] = logits.max() + 1.0
    return logits.astype(np.float32)
