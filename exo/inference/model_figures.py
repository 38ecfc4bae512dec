"""The planner's figures for a model file, from the file's real tensors at the precision the engines hold them (llama_weights'
rules), read from the file's metadata alone: nothing is loaded, so a node can size any shard before it loads it.

Per tensor: GGUF Q4_0 / Q4_1 / Q8_0 and MLX-quantized matrices are held as packed quants plus float16 scale and bias per group;
16-bit matrices and GGUF types dequantized on load as float16; float32 matrices and every vector as float32.
"""

from pathlib import Path

import gguf

from exo.base.errors import BadInput, ModelNotFound
from exo.base.model_spec import ModelSpec
from exo.base.models import MODELS
from exo.base.shard import Shard
from exo.inference.gguf_model import gguf_metadata
from exo.inference.llama_layout import EMBED, GGUF_GLOBALS, GGUF_PARTS, LM_HEAD, NORM, layer_key, layer_parts
from exo.inference.llama_weights import load_config
from exo.inference.model_files import HF_FILES, locate_model, missing_files
from exo.inference.model_sources import is_repo_id, local_path
from exo.inference.quantized import GGUF_GROUP, KEPT_QUANTIZED
from exo.inference.safetensors_model import safetensors_index

ACTIVATION_DTYPE_BYTES = 4  # the engines send hidden states between stages as float32
KV_DTYPE_BYTES = 4  # and keep their KV caches in float32
_GGUF_TO_HF = {**{v: k for k, v in GGUF_GLOBALS.items()}, **{v: k for k, v in GGUF_PARTS.items()}}
_HELD_BITS = {gguf.GGMLQuantizationType.Q4_0: 4, gguf.GGMLQuantizationType.Q4_1: 4, gguf.GGMLQuantizationType.Q8_0: 8}


def _gguf_name(name: str) -> str | None:
  """The Hugging Face name of a llama.cpp tensor name, or None for tensors engines do not hold (rope_freqs)."""
  if name in _GGUF_TO_HF:
    return _GGUF_TO_HF[name]
  if name.startswith("blk.") and (part := name.split(".", 2)[2]) in _GGUF_TO_HF:
    return layer_key(int(name.split(".")[1]), _GGUF_TO_HF[part])
  return None


def _dense_bytes(n: int, ndim: int, sixteen_bit: bool) -> int:
  return n * (2 if sixteen_bit and ndim >= 2 else 4)


def held_tensor_bytes(path: Path | str) -> dict[str, int]:
  """Bytes each tensor of the model takes once loaded, by Hugging Face name."""
  path = Path(path)
  sizes: dict[str, int] = {}
  if path.suffix == ".gguf":
    for t in gguf_metadata(str(path)).tensors.values():
      if (name := _gguf_name(t.name)) is None:
        continue
      n = int(t.n_elements)
      if t.tensor_type in KEPT_QUANTIZED:
        sizes[name] = n * _HELD_BITS[t.tensor_type] // 8 + n // GGUF_GROUP * 4
      else:
        sizes[name] = _dense_bytes(n, len(t.shape), t.tensor_type != gguf.GGMLQuantizationType.F32)
    return sizes
  for name, (_, entry, _) in safetensors_index(str(path)).items():
    start, end = entry["data_offsets"]
    if name.endswith((".scales", ".biases")):  # an MLX export's groups: counted with their matrix, at their own size
      held = _dense_bytes((end - start) // (2 if entry["dtype"] in ("F16", "BF16") else 4), 2, entry["dtype"] in ("F16", "BF16"))
      weight = name.rsplit(".", 1)[0] + ".weight"
      sizes[weight] = sizes.get(weight, 0) + held
      continue
    n = 1
    for dim in entry["shape"]:
      n *= dim
    held = end - start if entry["dtype"] == "U32" else _dense_bytes(n, len(entry["shape"]), entry["dtype"] in ("F16", "BF16"))
    sizes[name] = sizes.get(name, 0) + held
  return sizes


def shard_held_bytes(path: Path | str, shard: Shard) -> int:
  """Bytes of `shard`'s weights once loaded: its layers, the embedding on the first shard, the norm and head on the last
  (a tied head shares the embedding's matrix on a shard that holds both)."""
  sizes, config = held_tensor_bytes(path), load_config(path)
  total = sum(sizes[layer_key(i, part)] for i in range(shard.start_layer, shard.end_layer + 1) for part in layer_parts(config))
  if shard.is_first_layer():
    total += sizes[EMBED]
  if shard.is_last_layer():
    total += sizes[NORM] + (0 if config.tie_word_embeddings and shard.is_first_layer() else sizes[EMBED if config.tie_word_embeddings else LM_HEAD])
  return total


def model_spec_from_file(path: Path | str, model_id: str | None = None) -> ModelSpec:
  """The planner's ModelSpec of a model file (docs/DESIGN.md section 2): mean layer bytes, embedding and head bytes as held,
  FLOPs per token per layer (2 per matrix weight), float32 hidden states between stages, and float32 KV cache for the model's
  whole context per request (a plan reserves it for the context it plans, docs/DESIGN.md v2.1)."""
  path = Path(path)
  if not path.exists():
    raise ModelNotFound(f"model file {str(path)!r} was not found")
  if path.is_dir() and not (path / "config.json").is_file():
    raise ModelNotFound(f"{str(path)!r} is not a model directory (it has no config.json): a model is a .gguf file, or a directory holding {HF_FILES}")
  if path.is_file() and path.suffix != ".gguf":
    raise ModelNotFound(f"{str(path)!r} is not a model file: a model is a .gguf file, or a directory holding {HF_FILES}")
  config = load_config(path)
  if missing := missing_files(path):
    raise BadInput(f"model {str(path)!r} lacks {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}; expected every file of the model")
  sizes = held_tensor_bytes(path)
  layer_names = [layer_key(i, part) for i in range(config.n_layers) for part in layer_parts(config)]
  c = config
  attention = c.hidden_size * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
  matrix_weights = attention + 3 * c.hidden_size * c.intermediate_size
  return ModelSpec(
    id=model_id or path.stem,
    n_layers=c.n_layers,
    layer_bytes=sum(sizes[n] for n in layer_names) / c.n_layers,
    layer_flops=2.0 * matrix_weights,
    activation_bytes=float(c.hidden_size * ACTIVATION_DTYPE_BYTES),
    kv_bytes_per_layer=float(2 * c.n_kv_heads * c.head_dim * c.context_length * KV_DTYPE_BYTES),
    embed_bytes=float(sizes[EMBED]),
    head_bytes=float(sizes[NORM] + sizes[EMBED if c.tie_word_embeddings else LM_HEAD]),
    tied_embeddings=c.tie_word_embeddings,
    context_tokens=c.context_length,
    file_bytes=float(path.stat().st_size) if path.is_file() else 0.0,
  )


def served_model_spec(table_spec: ModelSpec) -> ModelSpec:
  """What a node serving `table_spec.id` from a file on this machine plans with: the file's figures, or the built-in table's
  when the files are not all here (the engine downloads what a shard needs when it loads it, or reports what is missing)."""
  try:
    path = locate_model(table_spec.id)
  except ModelNotFound:
    return table_spec
  return table_spec if missing_files(path) else model_spec_from_file(path, table_spec.id)


def model_spec_for(ref: str, from_files: bool = True, mirror=None) -> ModelSpec:
  """The spec a node plans the model `ref` with (exo.inference.model_sources names the kinds): a built-in id's (from its files
  with `from_files`, as served_model_spec), or the one read from the files of a local path (its id: the absolute path) or of a
  Hugging Face repo id (downloaded first if not here, asking `mirror` before the hub: the figures come from its files)."""
  if ref in MODELS:
    return served_model_spec(MODELS[ref]) if from_files else MODELS[ref]
  if (path := local_path(ref)) is not None:
    return model_spec_from_file(locate_model(str(path)), str(path))
  if is_repo_id(ref):
    from exo.inference.downloads import ensure_model

    return model_spec_from_file(ensure_model(ref, mirror=mirror), ref)
  if "/" in ref or ref.endswith(".gguf"):
    raise ModelNotFound(f"model file {ref!r} was not found: no such .gguf file or model directory")
  raise ModelNotFound(
    f"unknown model {ref!r}; expected a built-in id ({', '.join(sorted(MODELS))}), a Hugging Face repo id (owner/name) "
    "or the path of a .gguf file or model directory"
  )
