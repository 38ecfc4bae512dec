"""Greedy decoding on one engine holding the given shard (usually every layer): the answer any ring must reproduce."""

import numpy as np


async def greedy_tokens(engine, shard, prompt_ids, max_tokens: int, request_id: str = "reference") -> list[int]:
  """The prompt in one step, then one token a step at its position, until an EOS token or `max_tokens`; the state is released."""
  x, position, tokens = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1), 0, []
  while len(tokens) < max_tokens:
    tokens.append(await engine.sample(await engine.infer_tensor(request_id, shard, x, position)))
    if tokens[-1] in engine.eos_token_ids(shard):
      break
    position, x = position + x.shape[1], np.array([[tokens[-1]]], dtype=np.int64)
  await engine.finish_request(request_id)
  return tokens
