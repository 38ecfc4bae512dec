"""The ggml engine: tiny random Llama and Qwen2 models whose matrices are Q4_0, Q4_1, Q8_0, Q4_K or Q6_K against the numpy
reference (on the values gguf-py dequantizes from the file, not on ggml's), shards side by side giving one engine's outputs,
batched rows equal to each request alone, a KV window growing over cells it zeroes, and files it cannot use refused with
one message. The real SmolLM2 on rings of engines (ggml alone, and ggml with tinygrad and MLX) is in test_ring_of_engines.

Tolerance: ggml computes a product of a quantized matrix with activations rounded to 8 bits per block (Q8_0, Q8_1 or Q8_K,
as llama.cpp does), and keeps keys and values in float16; the logits are therefore close to the float32 reference, not equal.
"""

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

from exo.base.errors import BadInput
from exo.base.shard import Shard
from exo.inference.ggml_inference_engine import WINDOW, GGMLInferenceEngine
from exo.inference.gguf_model import unpermute_rope_rows
from exo.inference.inference_engine import Step
from exo.inference.llama_config import LlamaConfig
from exo.inference.llama_layout import EMBED, LM_HEAD, NORM, layer_key, layer_parts
from tests.inference.numpy_llama import forward
from tests.inference.tiny_models import TINY, Q, tiny_weights, write_gguf, write_hf_dir

# K-quants pack 256 values per block: every matrix's rows must hold a multiple of 256.
LLAMA = dataclasses.replace(TINY, vocab_size=96, hidden_size=256, intermediate_size=512, n_heads=4, n_kv_heads=2, head_dim=64)
QWEN2 = dataclasses.replace(LLAMA, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, architecture="qwen2", attention_bias=True)
FAMILIES = {"llama": LLAMA, "qwen2": QWEN2}
TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")
# Of the largest reference logit (these random models' logits are small, about 2.5, so rounding shows). Measured: 0.018-0.037 for
# every type and family, Q8_0 matrices included (the activations' rounding dominates); Q and K rows rotated in the wrong
# convention: 0.39-0.70.
LOGITS_RTOL = 0.08
PROMPT = np.array([3, 17, 5, 31, 8, 2, 26, 90, 44], dtype=np.int64)
_HF_NAMES = {"token_embd.weight": EMBED, "output_norm.weight": NORM, "output.weight": LM_HEAD}
_GGUF_TO_HF = {
  "attn_norm.weight": "input_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
}


def write_model(root: Path, family: str, kind: str) -> str:
  """The tiny `family` model with `kind` matrices (and embedding) under root, once; its model id."""
  model_id = f"ggml-{family}-{kind}"
  directory = root / model_id
  if not directory.exists():
    directory.mkdir()
    write_gguf(directory / "model.gguf", tiny_weights(FAMILIES[family], seed=2), FAMILIES[family], qtype=Q[kind])
    (directory / "tokenizer.json").write_text("{}")
  return model_id


def reference_weights(path: Path, config: LlamaConfig) -> dict[str, np.ndarray]:
  """Every tensor of the file as gguf-py's numpy dequantization gives it, by Hugging Face name, Q and K rows in HF order."""
  weights = {}
  for t in gguf.GGUFReader(str(path)).tensors:
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
    if t.name in _HF_NAMES:
      weights[_HF_NAMES[t.name]] = w
      continue
    layer, part = t.name.removeprefix("blk.").split(".", 1)
    name = layer_key(int(layer), _GGUF_TO_HF[part])
    if config.architecture == "llama" and part in ("attn_q.weight", "attn_k.weight"):
      w = w[unpermute_rope_rows(np.arange(w.shape[0]), config.n_heads if part == "attn_q.weight" else config.n_kv_heads)]
    weights[name] = w
  if config.tie_word_embeddings:
    weights[LM_HEAD] = weights[EMBED]
  assert set(weights) == {EMBED, NORM, LM_HEAD} | {layer_key(i, p) for i in range(config.n_layers) for p in layer_parts(config)}
  return weights


def whole(model_id: str, config: LlamaConfig) -> Shard:
  return Shard(model_id, 0, config.n_layers - 1, config.n_layers)


@contextlib.contextmanager
def fresh_engines(count: int):
  """`count` engines of their own, closed afterwards."""
  engines = [GGMLInferenceEngine(threads=2) for _ in range(count)]
  try:
    yield engines
  finally:
    for engine in engines:
      engine.close()


async def prompt_then_decode(ring: list[tuple[GGMLInferenceEngine, Shard]], request: str, steps: int) -> list[np.ndarray]:
  """The last shard's logits for PROMPT and then `steps` greedy decode steps through the ring's engines and shards in turn."""
  x, position, outputs = PROMPT, 0, []
  for _ in range(steps + 1):
    for engine, shard in ring:
      x = await engine.infer_tensor(request, shard, x, position)
    outputs.append(x)
    position += len(PROMPT) if position == 0 else 1
    x = np.array([int(np.argmax(x[0, -1]))], dtype=np.int64)
  return outputs


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", TYPES)
def test_logits_match_the_numpy_reference(models, family, kind):
  config = FAMILIES[family]
  model_id = write_model(models, family, kind)
  weights = reference_weights(models / model_id / "model.gguf", config)
  engine = GGMLInferenceEngine(threads=2)
  try:
    outputs = asyncio.run(prompt_then_decode([(engine, whole(model_id, config))], "r", 3))
  finally:
    engine.close()
  cache: dict = {}
  expected = [forward(weights, config, PROMPT, 0, config.n_layers - 1, cache)]
  for out in outputs[:-1]:
    expected.append(forward(weights, config, np.array([int(np.argmax(out[0, -1]))]), 0, config.n_layers - 1, cache))
  for got, want in zip(outputs, expected):
    assert got.shape == (1, *want.shape) and got.dtype == np.float32
    assert np.abs(got[0] - want).max() <= LOGITS_RTOL * np.abs(want).max(), (family, kind)


def test_a_split_over_shards_gives_the_whole_models_outputs_exactly(models):
  """Hidden states cross shards as float32, and every row's products run the same kernels whatever the shard holds."""
  model_id = write_model(models, "qwen2", "Q4_K")
  with fresh_engines(3) as engines:
    alone = asyncio.run(prompt_then_decode([(engines[0], whole(model_id, QWEN2))], "r", 4))
    split = asyncio.run(prompt_then_decode([(engines[1], Shard(model_id, 0, 0, 3)), (engines[2], Shard(model_id, 1, 2, 3))], "r", 4))
  for a, b in zip(alone, split):
    assert np.array_equal(a, b)


def test_batched_rows_equal_each_request_alone(models):
  model_id = write_model(models, "llama", "Q4_1")
  shard = whole(model_id, LLAMA)
  prompts = {f"r{i}": PROMPT[: 3 + i] for i in range(5)}  # different lengths: different positions while decoding together

  async def run(batched: bool) -> dict[str, list[np.ndarray]]:
    engine = GGMLInferenceEngine(threads=2)
    try:
      last = {r: await engine.infer_tensor(r, shard, p, 0) for r, p in prompts.items()}
      positions, outputs = {r: len(p) for r, p in prompts.items()}, {r: [] for r in prompts}
      for _ in range(4):
        steps = [Step(r, np.array([int(np.argmax(last[r][0, -1]))]), positions[r]) for r in prompts]
        outs = (
          await engine.infer_batch(shard, steps)
          if batched
          else [await engine.infer_tensor(s.request_id, shard, s.input_data, s.position) for s in steps]
        )
        for step, out in zip(steps, outs):
          last[step.request_id] = out
          outputs[step.request_id].append(out)
          positions[step.request_id] += 1
      if batched:
        assert any(len(key[0]) == len(prompts) for key in engine._models[shard].graphs)  # one graph ran all five
      return outputs
    finally:
      engine.close()

  alone, together = asyncio.run(run(False)), asyncio.run(run(True))
  for r in prompts:
    for a, b in zip(alone[r], together[r]):
      assert np.array_equal(a, b)


def test_attention_windows_grow_over_zeroed_cells_and_reuse_graphs(models):
  """A request decoding past WINDOW positions keeps matching the reference; each window's graph is built once."""
  config = dataclasses.replace(LLAMA, context_length=2 * WINDOW + 64)
  model_id = "ggml-llama-long"
  if not (models / model_id).exists():
    (models / model_id).mkdir()
    write_gguf(models / model_id / "model.gguf", tiny_weights(config, seed=3), config, qtype=Q.Q8_0)
    (models / model_id / "tokenizer.json").write_text("{}")
  weights = reference_weights(models / model_id / "model.gguf", config)
  shard = whole(model_id, config)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, WINDOW + 40)
  engine = GGMLInferenceEngine(threads=2)
  try:

    async def run():
      out = await engine.infer_tensor("r", shard, tokens[: WINDOW - 20], 0)
      for position in range(WINDOW - 20, len(tokens)):
        out = await engine.infer_tensor("r", shard, tokens[position : position + 1], position)
      return out

    last = asyncio.run(run())
    decode_graphs = [key for key in engine._models[shard].graphs if key[1] == (1,)]
    assert sorted(key[2] for key in decode_graphs) == [(WINDOW,), (2 * WINDOW,)]
  finally:
    engine.close()
  want = forward(weights, config, tokens, 0, config.n_layers - 1)[-1]
  assert np.abs(last[0, -1] - want).max() <= LOGITS_RTOL * np.abs(want).max()


def test_a_model_not_in_gguf_is_refused_with_one_message(models):
  model_id = "ggml-hf-checkpoint"
  write_hf_dir(models / model_id, tiny_weights(TINY), TINY, dtype="F32")
  (models / model_id / "tokenizer.json").write_text("{}")
  engine = GGMLInferenceEngine(threads=1)
  try:
    with pytest.raises(BadInput, match="the ggml engine reads GGUF files"):
      asyncio.run(engine.infer_tensor("r", whole(model_id, TINY), PROMPT, 0))
  finally:
    engine.close()


def test_a_step_wanting_its_last_row_only_gets_that_rows_logits(models):
  """Step.last_only: the head runs on the prompt's last row alone, and its logits are those of the full prompt's last row."""
  model_id = write_model(models, "llama", "Q8_0")
  shard = whole(model_id, LLAMA)
  engine = GGMLInferenceEngine(threads=2)
  try:
    full = asyncio.run(engine.infer_tensor("all", shard, PROMPT, 0))
    [last] = asyncio.run(engine.infer_batch(shard, [Step("last", PROMPT, 0, last_only=True)]))
    assert any(key[3] == 1 and key[1] == (len(PROMPT),) for key in engine._models[shard].graphs)  # a head over one row ran
  finally:
    engine.close()
  assert full.shape == (1, len(PROMPT), LLAMA.vocab_size) and last.shape == (1, 1, LLAMA.vocab_size)
  assert np.array_equal(last[0, 0], full[0, -1])


def test_kept_graphs_still_run_right_after_a_larger_graph_grows_the_allocators_buffer(models):
  """ggml places a graph's intermediate tensors once: a graph kept from before the buffer grew would write into freed memory
  (a node crashed so when a long prompt came between decode steps). The decode steps after a long prompt still give the
  outputs of the same request alone."""
  model_id = write_model(models, "llama", "Q4_1")
  shard = whole(model_id, LLAMA)
  long_prompt = np.random.default_rng(1).integers(0, LLAMA.vocab_size, 900)

  async def decode(engine: GGMLInferenceEngine, interrupt: bool) -> list[np.ndarray]:
    out, outputs = await engine.infer_tensor("a", shard, PROMPT, 0), []
    for position in range(len(PROMPT), len(PROMPT) + 6):
      if interrupt and position == len(PROMPT) + 3:
        await engine.infer_tensor("b", shard, long_prompt, 0)
      out = await engine.infer_tensor("a", shard, np.array([int(np.argmax(out[0, -1]))]), position)
      outputs.append(out)
    return outputs

  with fresh_engines(2) as engines:
    alone, interrupted = asyncio.run(decode(engines[0], False)), asyncio.run(decode(engines[1], True))
  for a, b in zip(alone, interrupted):
    assert np.array_equal(a, b)


def test_prompt_rows_and_decode_steps_of_different_requests_in_one_call_equal_each_alone(models):
  """One infer_batch of two decode steps and two prompts (7 and 5 rows, the last shard's logits of every row) runs as one graph
  and gives each request the outputs it gets alone."""
  model_id = write_model(models, "qwen2", "Q8_0")
  shard = whole(model_id, QWEN2)
  started = {"a": PROMPT[:4], "b": PROMPT[:6]}
  steps = [Step("a", np.array([7]), 4), Step("c", PROMPT[:7], 0), Step("b", np.array([9]), 6), Step("d", PROMPT[2:7], 0)]

  async def run(together: bool) -> list[np.ndarray]:
    engine = GGMLInferenceEngine(threads=2)
    try:
      for request, prompt in started.items():
        await engine.infer_tensor(request, shard, prompt, 0)
      if together:
        outs = await engine.infer_batch(shard, steps)
        assert [len(key[1]) for key in engine._models[shard].graphs if 1 in key[1] and 7 in key[1]] == [4]  # one graph ran all four
        return outs
      return [await engine.infer_tensor(s.request_id, shard, s.input_data, s.position) for s in steps]
    finally:
      engine.close()

  alone, together = asyncio.run(run(False)), asyncio.run(run(True))
  assert [out.shape[1] for out in together] == [1, 7, 1, 5]
  for a, b in zip(alone, together):
    assert np.array_equal(a, b)
