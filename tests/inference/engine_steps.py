"""Requests stepped through rings of engines, as the engine tests drive them: one step through every shard of a ring, greedy
generation, the shard of a whole model, and an output's check against the numpy reference."""

import numpy as np

from exo.base.shard import Shard


async def through(ring: list[tuple], request_id: str, x: np.ndarray, position: int) -> np.ndarray:
  """x at `position` through the ring's engines and shards in turn: the last shard's output."""
  for engine, shard in ring:
    x = await engine.infer_tensor(request_id, shard, x, position)
  return x


async def greedy(ring: list[tuple], prompt: np.ndarray, steps: int, request_id: str) -> tuple[list[int], np.ndarray]:
  """`steps` greedy tokens (past EOS too: more to compare) for `prompt` through the ring, and the last logits; then the request
  is finished everywhere."""
  x, position, tokens = prompt, 0, []
  while len(tokens) < steps:
    logits = await through(ring, request_id, x, position)
    position += len(x)
    tokens.append(await ring[-1][0].sample(logits))
    x = np.array(tokens[-1:], dtype=np.int64)
  for engine, _ in ring:
    await engine.finish_request(request_id)
  return tokens, logits


def whole(model_id: str, n_layers: int) -> Shard:
  """The shard of every layer of the model."""
  return Shard(model_id, 0, n_layers - 1, n_layers)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float):
  """float32 of the expected shape, within rtol of the largest expected magnitude."""
  assert actual.shape == expected.shape and actual.dtype == np.float32
  assert np.abs(actual - expected).max() <= rtol * np.abs(expected).max()
