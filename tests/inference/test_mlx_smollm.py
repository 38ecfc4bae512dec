"""MLXInferenceEngine on the real SmolLM2-135M Q4_1 GGUF: layers held at the file's size, logits against the numpy reference,
the answer, and split rings giving one engine's tokens. MLX here runs on CPU: a 37-token SmolLM2 prompt takes seconds, so most
of these tests are slow."""

import asyncio

import mlx.core as mx
import numpy as np
import pytest

from exo.base.shard import Shard
from exo.inference.llama_layout import layer_key
from exo.inference.llama_weights import load_shard_weights
from exo.inference.mlx_inference_engine import MLXInferenceEngine
from exo.inference.model_figures import held_tensor_bytes, shard_held_bytes
from exo.inference.model_files import locate_model
from tests.inference.engine_steps import assert_close, greedy
from tests.inference.numpy_llama import forward

SMOL, SMOL_LAYERS = "smollm2-135m", 30
SMOL_WHOLE = Shard(SMOL, 0, SMOL_LAYERS - 1, SMOL_LAYERS)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER_TOKENS = 24
SMOL_RTOL = 2e-5  # of the largest logit (~40); observed ~4e-6


def test_half_the_layers_hold_half_the_layer_bytes():
  """SmolLM2's layers 5-19 (15 of 30, no embedding or head) as held: half the file's layer bytes, still 4-bit."""
  path, shard = locate_model(SMOL), Shard(SMOL, 5, 19, SMOL_LAYERS)
  layer_bytes = sum(n for name, n in held_tensor_bytes(path).items() if name.startswith("model.layers."))
  engine = MLXInferenceEngine()
  asyncio.run(engine.load_shard(shard))
  held = engine.held_arrays(shard)
  assert {name.split(".")[2] for name in held} == {str(i) for i in range(5, 20)}
  assert engine.held_array_bytes(shard) == pytest.approx(layer_bytes / 2, rel=0.01)
  assert held[layer_key(5, "mlp.up_proj.weight")].dtype == mx.uint32
  engine.close()


@pytest.fixture(scope="module")
def smol():
  engine = MLXInferenceEngine()
  yield engine
  engine.close()


@pytest.fixture(scope="module")
def smol_prompt(smol) -> np.ndarray:
  async def go():
    return await smol.encode(SMOL_WHOLE, await smol.apply_chat_template(SMOL_WHOLE, QUESTION))

  return asyncio.run(go())


@pytest.fixture(scope="module")
def smol_tokens(smol, smol_prompt) -> list[int]:
  return asyncio.run(greedy([(smol, SMOL_WHOLE)], smol_prompt, ANSWER_TOKENS, "single"))[0]


@pytest.mark.slow
def test_smollm2_logits_match_numpy_reference(smol, smol_prompt):
  """The prompt and two decode steps; the 4-bit layers and 8-bit tied embedding dequantized by the reference."""
  config, weights = load_shard_weights(locate_model(SMOL), SMOL_WHOLE)

  async def go():
    cache, x, position = {}, smol_prompt, 0
    for _ in range(3):
      logits = await smol.infer_tensor("reference", SMOL_WHOLE, x, position)
      expected = forward(weights, config, x, 0, SMOL_LAYERS - 1, cache)
      assert_close(logits[0], expected, SMOL_RTOL)
      position += len(x)
      x = np.array([int(np.argmax(expected[-1]))])
    await smol.finish_request("reference")

  asyncio.run(go())


@pytest.mark.slow
def test_smollm2_answers_paris(smol, smol_tokens):
  eos = smol.eos_token_ids(SMOL_WHOLE)
  answer = smol_tokens[: next((i for i, t in enumerate(smol_tokens) if t in eos), len(smol_tokens))]
  assert len(answer) >= 3 and "Paris" in asyncio.run(smol.decode(SMOL_WHOLE, answer))


@pytest.mark.slow
def test_smollm2_is_held_at_its_file_size(smol, smol_tokens):
  path = locate_model(SMOL)
  assert smol.held_array_bytes(SMOL_WHOLE) == shard_held_bytes(path, SMOL_WHOLE)
  assert smol.held_array_bytes(SMOL_WHOLE) == pytest.approx(path.stat().st_size, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("ranges", [((0, 20), (21, 29)), ((0, 4), (5, 22), (23, 29))], ids=["2-engines", "3-engines"])
def test_smollm2_split_gives_one_engines_tokens(ranges, smol_prompt, smol_tokens, mlx_engines):
  ring = list(zip(mlx_engines(len(ranges)), (Shard(SMOL, a, b, SMOL_LAYERS) for a, b in ranges)))
  assert asyncio.run(greedy(ring, smol_prompt, 12, "split"))[0] == smol_tokens[:12]
  assert all(engine.active_requests() == set() for engine, _ in ring)
