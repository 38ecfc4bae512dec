"""The stand-in hub of the download tests (exo.tools.local_hub), and models it serves: a tiny Llama checkpoint that exo can serve
(a word-level tokenizer with a chat template, its weights split one layer per safetensors file under
model.safetensors.index.json, so a shard's files are a subset) and a tiny GGUF file."""

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from exo.inference.llama_layout import EMBED, LM_HEAD, NORM
from exo.tools.local_hub import COMMIT, LocalHub  # noqa: F401  (the tests import the hub from here with the models)
from tests.inference.tiny_models import TINY, tiny_weights, write_gguf, write_safetensors

WORDS = ["<unk>", "<|end|>", "user", "assistant", "system", ":", "hi", "hello", "paris", "is", "the", "capital"]


def tiny_tokenizer_files() -> dict[str, bytes]:
  """tokenizer.json (one token per word, len(WORDS) of the TINY vocabulary) and tokenizer_config.json with a chat template."""
  vocab = {word: i for i, word in enumerate(WORDS)} | {f"w{i}": i for i in range(len(WORDS), TINY.vocab_size)}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.add_special_tokens(["<|end|>"])
  template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
  config = {"eos_token": "<|end|>", "chat_template": template, "add_bos_token": False}
  return {"tokenizer.json": tokenizer.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


def tiny_checkpoint(directory: Path) -> dict[str, bytes]:
  """The files of a tiny Llama checkpoint (TINY, random weights): the embedding, norm and head in one safetensors file, each
  layer in one of its own, as large checkpoints are split; returns {file name: bytes}."""
  weights = tiny_weights(seed=11)
  c = TINY
  config = {
    "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
    "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "rope_theta": c.rope_theta,
    "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.context_length, "tie_word_embeddings": False, "torch_dtype": "float32",
  }  # fmt: skip
  groups = {f"model-00001-of-{c.n_layers + 1:05d}.safetensors": [EMBED, NORM, LM_HEAD]}
  for layer in range(c.n_layers):
    groups[f"model-{layer + 2:05d}-of-{c.n_layers + 1:05d}.safetensors"] = [n for n in weights if n.startswith(f"model.layers.{layer}.")]
  files = {"config.json": json.dumps(config).encode(), **tiny_tokenizer_files()}
  directory.mkdir(parents=True, exist_ok=True)
  for filename, names in groups.items():
    write_safetensors(directory / filename, {n: weights[n] for n in names})
    files[filename] = (directory / filename).read_bytes()
  index = {"metadata": {}, "weight_map": {n: filename for filename, names in groups.items() for n in names}}
  files["model.safetensors.index.json"] = json.dumps(index).encode()
  return files


def tiny_gguf(directory: Path) -> bytes:
  """A tiny GGUF model file's bytes (TINY, no tokenizer: enough to download and load its weights)."""
  directory.mkdir(parents=True, exist_ok=True)
  write_gguf(directory / "tiny.gguf", tiny_weights(seed=12), TINY)
  return (directory / "tiny.gguf").read_bytes()
