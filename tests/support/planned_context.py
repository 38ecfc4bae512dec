"""The planned context worked out by hand (docs/DESIGN.md section 2, v2.1) for one or two nodes under the latency objective:
the oracle the tests of a planned context check `context_tokens` against, independent of the planner's searches."""

import math

from exo.base.model_spec import ModelSpec

STEP, LEAST, MOST = 256, 512, 8192  # a context below the cap is a multiple of STEP, at least LEAST; the cap is at most MOST


def layers_held(model: ModelSpec, memory_mb: float, first: bool, last: bool, context: int, headroom: float = 0.1) -> int:
  """floor((M (1 - h) - E [first] - H [last]) / (B + K C / N)): one request's KV (c = 1), E and H once when tied and alone."""
  if first and last and model.tied_embeddings:
    reserved = max(model.embed_bytes, model.head_bytes)
  else:
    reserved = model.embed_bytes * first + model.head_bytes * last
  per_layer = model.layer_bytes + model.kv_bytes_per_layer * context / model.context_tokens
  return math.floor((memory_mb * 2**20 * (1 - headroom) - reserved) / per_layer)


def holds(model: ModelSpec, memories_mb: list[float], context: int) -> bool:
  """Whether one of the nodes alone, or two of them as a ring (either first), hold every layer at `context`."""
  if any(layers_held(model, m, True, True, context) >= model.n_layers for m in memories_mb):
    return True
  for i, a in enumerate(memories_mb):
    for j, b in enumerate(memories_mb):
      first, last = layers_held(model, a, True, False, context), layers_held(model, b, False, True, context)
      if i != j and first >= 1 and last >= 1 and first + last >= model.n_layers:
        return True
  return False


def largest_context(model: ModelSpec, memories_mb: list[float], cap: int | None = None) -> int:
  """The context a plan reserves: the cap (the model's context, at most MOST, and at most `cap`) if the nodes hold the model at
  it, else the largest multiple of STEP below it, at least LEAST, at which they do."""
  top = min(model.context_tokens, MOST, cap or MOST)
  if holds(model, memories_mb, top):
    return top
  for context in range((top - 1) // STEP * STEP, LEAST - 1, -STEP):
    if holds(model, memories_mb, context):
      return context
  raise AssertionError(f"{memories_mb} MB cannot hold {model.id} even at {LEAST} tokens")
