"""MLXInferenceEngine on tiny random models of both families in every file format: logits against the numpy reference, weights
held at the file's precision, and request state through the engine. The real SmolLM2-135M is test_mlx_smollm's."""

import asyncio
import dataclasses
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from exo.base.shard import Shard
from exo.inference.llama_config import rope_scaling_factors
from exo.inference.llama_layout import EMBED, LM_HEAD
from exo.inference.llama_weights import load_shard_weights
from exo.inference.model_figures import shard_held_bytes
from exo.inference.model_files import locate_model
from exo.inference.quantized import QuantizedMatrix
from exo.inference.sharded_engine import RequestStateError
from tests.inference.engine_steps import assert_close, greedy, through
from tests.inference.numpy_llama import forward
from tests.inference.tiny_models import FAMILIES, TINY, TINY_QWEN2, Q, tiny_weights, write_gguf, write_hf_dir
from tests.support.patience import STALL_S

TINY_ID = "tiny"
FORMATS = {  # how the tiny model is written: a GGUF's matrix (and embedding) type, or a Hugging Face directory's dtype / MLX bits
  "gguf-q4_0": {"qtype": Q.Q4_0},
  "gguf-q4_1": {"qtype": Q.Q4_1, "embed_qtype": Q.Q8_0},  # as SmolLM2's GGUF
  "gguf-q8_0": {"qtype": Q.Q8_0},
  "gguf-f16": {"qtype": Q.F16},
  "hf-f32": {"dtype": "F32"},
  "hf-bf16": {"dtype": "BF16"},
  "mlx-4bit": {"mlx_bits": 4, "group_size": 32},
  "mlx-8bit": {"mlx_bits": 8, "group_size": 64},
}
PROMPT = np.array([3, 17, 5, 28, 11, 2, 39], dtype=np.int64)
TINY_RTOL = 2e-5  # of the largest expected magnitude; observed at most 1.6e-6: the same weights, float32 sums in another order
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def tiny_shard(start: int, end: int, config=TINY) -> Shard:
  return Shard(TINY_ID, start, end, config.n_layers)


@pytest.fixture
def make_tiny(tmp_path, monkeypatch):
  """Writes the tiny model of `config` in format `fmt` under a fresh EXO_MODELS_DIR as model TINY_ID; returns its path."""
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path))

  def make(config, fmt: str, rope_scaling: dict | None = None, rope_factors=None):
    directory, weights = tmp_path / TINY_ID, tiny_weights(config, seed=1)
    if fmt.startswith("gguf"):
      directory.mkdir()
      write_gguf(directory / "tiny.gguf", weights, config, rope_factors=rope_factors, **FORMATS[fmt])
    else:
      write_hf_dir(directory, weights, config, rope_scaling=rope_scaling, **FORMATS[fmt])
      (directory / "tokenizer.json").write_text("{}")  # only the weights are used
    return locate_model(TINY_ID)

  return make


# the numpy reference, every family and format


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_numpy_reference(make_tiny, mlx_engines, family, fmt):
  """The prompt, then three decode steps at their positions, each against the reference on the same (dequantized) weights."""
  config = FAMILIES[family]
  path, shard = make_tiny(config, fmt), tiny_shard(0, config.n_layers - 1, config)
  loaded_config, weights = load_shard_weights(path, shard)
  (engine,) = mlx_engines(1)

  async def go():
    cache, x, position = {}, PROMPT, 0
    for _ in range(4):
      logits = await engine.infer_tensor("r", shard, x, position)
      expected = forward(weights, loaded_config, x, 0, config.n_layers - 1, cache)
      assert_close(logits[0], expected, TINY_RTOL)
      position += len(x)
      x = np.array([int(np.argmax(expected[-1]))])

  asyncio.run(go())
  assert engine.held_array_bytes(shard) == shard_held_bytes(path, shard)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_over_three_engines_equals_one_and_the_reference(make_tiny, mlx_engines, family):
  config = FAMILIES[family]
  path = make_tiny(config, "gguf-q4_1")
  _, weights = load_shard_weights(path, tiny_shard(0, 2, config))
  whole, parts = tiny_shard(0, 2, config), [tiny_shard(i, i, config) for i in range(3)]
  one, three = mlx_engines(1), mlx_engines(3)

  async def go():
    caches, x, position = [{}, {}, {}], PROMPT, 0
    for _ in range(3):
      alone = await through([(one[0], whole)], "r", x, position)
      hidden = x
      for i, (engine, shard) in enumerate(zip(three, parts)):
        out = await engine.infer_tensor("r", shard, hidden, position)
        assert_close(out[0], forward(weights, config, hidden if i == 0 else hidden[0], i, i, caches[i]), TINY_RTOL)
        hidden = out
      np.testing.assert_array_equal(hidden, alone)  # one graph per shard: the same arithmetic wherever the model is cut
      position += len(x)
      x = np.array([int(np.argmax(alone[0, -1]))])

  asyncio.run(go())


@pytest.mark.parametrize("fmt", ["hf-f32", "gguf-q8_0"])
def test_llama3_rope_scaling_matches_the_reference(make_tiny, mlx_engines, fmt):
  """Llama 3.1 scaling, from config.json's rope_scaling or a GGUF's rope_freqs tensor, at positions where it changes the logits."""
  factors = rope_scaling_factors(SCALING, TINY.rope_theta, TINY.head_dim)
  path, shard = make_tiny(TINY, fmt, rope_scaling=SCALING, rope_factors=factors), tiny_shard(0, 2)
  config, weights = load_shard_weights(path, shard)
  assert config.rope_freq_factors == pytest.approx(factors) and max(factors) == SCALING["factor"]
  prompt = np.resize(PROMPT, 100)
  (engine,) = mlx_engines(1)
  logits = asyncio.run(engine.infer_tensor("r", shard, prompt, 0))[0]
  assert_close(logits, forward(weights, config, prompt, 0, 2), TINY_RTOL)
  unscaled = forward(weights, dataclasses.replace(config, rope_freq_factors=None), prompt, 0, 2)
  assert np.abs(unscaled - logits).max() > 100 * TINY_RTOL * np.abs(logits).max()


# weights held at the file's precision


def expected_arrays(weights: dict, shard: Shard) -> set[str]:
  """The names of the arrays a shard should hold: a quantized matrix as .weight, .scales and .biases; a head tied to an
  embedding on the same shard once, as the embedding."""
  names = set()
  for name, w in weights.items():
    if name == LM_HEAD and w is weights.get(EMBED):
      continue
    module = name.removesuffix(".weight")
    names |= {name, f"{module}.scales", f"{module}.biases"} if isinstance(w, QuantizedMatrix) else {name}
  return names


@pytest.mark.parametrize("family,fmt", [("llama", "gguf-q4_1"), ("qwen2", "mlx-4bit"), ("llama", "gguf-f16"), ("qwen2", "hf-bf16")])
def test_each_shard_holds_only_its_weights_at_file_precision(make_tiny, mlx_engines, family, fmt):
  config = FAMILIES[family]
  path = make_tiny(config, fmt)
  (engine,) = mlx_engines(1)
  for start, end in ((0, 2), (0, 0), (1, 1), (2, 2)):
    shard = tiny_shard(start, end, config)
    asyncio.run(engine.load_shard(shard))
    held, (_, weights) = engine.held_arrays(shard), load_shard_weights(path, shard)
    assert set(held) == expected_arrays(weights, shard), shard
    assert all(f"model.layers.{i}." not in name for name in held for i in range(config.n_layers) if not start <= i <= end)
    for name, a in held.items():
      if a.ndim == 1:
        assert a.dtype == mx.float32, name
      elif fmt in ("gguf-q4_1", "mlx-4bit"):
        assert a.dtype == (mx.uint32 if name.endswith(".weight") else mx.float16), name
      else:
        assert a.dtype == mx.float16, name
    assert engine.held_array_bytes(shard) == shard_held_bytes(path, shard)


# request state


def test_steps_out_of_place_raise_and_leave_the_request_intact(make_tiny, mlx_engines):
  make_tiny(TINY, "gguf-q4_1")
  whole, n = tiny_shard(0, 2), len(PROMPT)
  engine, other = mlx_engines(2)

  async def go():
    await engine.infer_tensor("a", whole, PROMPT, 0)
    for position in (n - 1, n + 1, 0):  # repeated, skipped, restarted
      with pytest.raises(RequestStateError, match=f"at position {n}"):
        await engine.infer_tensor("a", whole, np.array([4]), position)
    with pytest.raises(RequestStateError, match="unknown"):
      await engine.infer_tensor("lost", whole, np.array([4]), 3)
    with pytest.raises(RequestStateError, match="runs on layers 0-2"):
      await engine.infer_tensor("a", tiny_shard(0, 1), np.array([4]), n)
    step = await engine.infer_tensor("a", whole, np.array([4]), n)
    at_once = await other.infer_tensor("b", whole, np.append(PROMPT, 4), 0)
    assert_close(step[0, -1], at_once[0, -1], TINY_RTOL)
    assert engine.active_requests() == {"a"}
    await engine.finish_request("a")
    assert engine.active_requests() == set()

  asyncio.run(go())


def test_a_failed_step_leaves_the_request_where_it_was(make_tiny, mlx_engines, monkeypatch):
  """A step that fails after the KV caches took its token (here: evaluation) is undone, so the step can be retried."""
  make_tiny(TINY, "gguf-q4_1")
  whole, n = tiny_shard(0, 2), len(PROMPT)
  (engine,) = mlx_engines(1)
  evaluate = mx.eval

  def fail(*args):
    raise RuntimeError("evaluation failed")

  async def go():
    await engine.infer_tensor("a", whole, PROMPT, 0)
    await engine.infer_tensor("b", whole, PROMPT, 0)
    monkeypatch.setattr(mx, "eval", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
      await engine.infer_tensor("a", whole, np.array([4, 9]), n)
    monkeypatch.setattr(mx, "eval", evaluate)
    retried = await engine.infer_tensor("a", whole, np.array([4, 9]), n)
    np.testing.assert_array_equal(retried, await engine.infer_tensor("b", whole, np.array([4, 9]), n))

  asyncio.run(go())


def test_prompt_in_chunks_equals_prompt_at_once(make_tiny, mlx_engines):
  """New positions attend to the whole cache and causally to each other, however the prompt arrives."""
  make_tiny(TINY_QWEN2, "mlx-8bit")
  shard = tiny_shard(1, 2, TINY_QWEN2)
  (engine,) = mlx_engines(1)
  hidden = np.random.default_rng(0).standard_normal((1, len(PROMPT), TINY_QWEN2.hidden_size)).astype(np.float32)

  async def go():
    whole = await engine.infer_tensor("whole", shard, hidden, 0)
    parts = [await engine.infer_tensor("parts", shard, hidden[:, a:b], a) for a, b in ((0, 3), (3, 4), (4, 7))]
    return whole, np.concatenate(parts, axis=1)

  whole, parts = asyncio.run(go())
  assert_close(parts[0], whole[0], TINY_RTOL)


def test_two_resident_shards_serve_interleaved_requests(make_tiny, mlx_engines):
  """One engine holds the whole model for one request and layers 0-1 for another (finished by a second engine); stepped in
  turns, each request gets exactly the tokens it gets alone."""
  make_tiny(TINY, "gguf-q4_0")
  whole, head, tail = tiny_shard(0, 2), tiny_shard(0, 1), tiny_shard(2, 2)
  engine, next_engine = mlx_engines(2)
  rings = {"a": [(engine, whole)], "b": [(engine, head), (next_engine, tail)]}
  prompts = {"a": PROMPT, "b": PROMPT[::-1].copy()}

  async def go():
    alone = {r: (await greedy(rings[r], prompts[r], 6, f"alone-{r}"))[0] for r in rings}
    x, position, tokens = dict(prompts), dict.fromkeys(rings, 0), {r: [] for r in rings}
    for _ in range(6):
      for r in rings:
        logits = await through(rings[r], r, x[r], position[r])
        position[r] += len(x[r])
        tokens[r].append(await engine.sample(logits))
        x[r] = np.array([tokens[r][-1]])
      assert set(engine.resident_shards()) == {whole, head}
      assert engine.held_bytes() == engine.held_array_bytes(whole) + engine.held_array_bytes(head)
    return alone, tokens

  alone, tokens = asyncio.run(go())
  assert tokens == alone


def test_a_shard_that_does_not_fit_waits_for_the_requests_on_the_other(make_tiny, mlx_engines):
  path = make_tiny(TINY, "gguf-q4_1")
  first, second = tiny_shard(0, 2), tiny_shard(0, 1)
  (engine,) = mlx_engines(1, memory_limit_bytes=shard_held_bytes(path, first) + shard_held_bytes(path, second) - 1)

  async def until_waiting():
    while engine.waiting is None:
      await asyncio.sleep(0.01)

  async def go():
    await engine.infer_tensor("a", first, PROMPT, 0)
    b = asyncio.create_task(engine.infer_tensor("b", second, PROMPT, 0))
    await asyncio.wait_for(until_waiting(), STALL_S)
    assert "0-2" in engine.waiting and engine.resident_shards() == [first] and not b.done()
    await engine.finish_request("a")
    assert (await b).shape == (1, len(PROMPT), TINY.hidden_size)
    assert engine.resident_shards() == [second] and engine.held_bytes() == engine.held_array_bytes(second)

  asyncio.run(go())


def test_bad_input_is_refused_and_leaves_no_state(make_tiny, mlx_engines):
  make_tiny(TINY, "gguf-q8_0")
  (engine,) = mlx_engines(1)

  async def go():
    with pytest.raises(ValueError, match="token ids"):
      await engine.infer_tensor("x", tiny_shard(0, 0), np.array([TINY.vocab_size]), 0)
    with pytest.raises(ValueError, match="hidden states"):
      await engine.infer_tensor("x", tiny_shard(1, 1), np.zeros((1, 2, 7), dtype=np.float32), 0)
    assert engine.active_requests() == set()

  asyncio.run(go())


def test_the_engine_loads_mlx_lm_models_without_transformers_and_leaves_mlx_lm_whole():
  script = (
    "import sys, exo.inference.mlx_inference_engine as engine\n"
    "assert 'transformers' not in sys.modules and 'mlx_lm' not in sys.modules\n"
    "import mlx_lm, mlx_lm.models.llama\n"
    "assert hasattr(mlx_lm, 'load') and hasattr(mlx_lm.models.llama, 'Model') and engine.llama.TransformerBlock\n"
  )
  subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
