"""A Hugging Face checkpoint directory (config.json and *.safetensors files, an MLX export's quantized ones included) as a
Llama-family model: its config, checked against the checkpoint's tensors, and its tensors one by one at their held precision in
llama_weights' convention. Every safetensors header is checked against its file before use (safetensors_header)."""

import dataclasses
import functools
import math
import os
import struct
from pathlib import Path

import numpy as np

from exo.base.errors import BadInput
from exo.base.files import open_regular
from exo.inference.llama_config import ARCHITECTURES, LlamaConfig, checked_config
from exo.inference.llama_layout import LM_HEAD, check_tensors
from exo.inference.model_file_checks import MAX_JSON_BYTES, parse_json_object, read_json, shown
from exo.inference.quantized import Weight, from_mlx, held

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16, "U32": np.uint32}  # BF16: widened below
_ST_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MLX_BITS, MLX_GROUP_SIZES = (2, 3, 4, 6, 8), (32, 64, 128)
_HF_KEYS = {  # LlamaConfig field: its config.json key
  "vocab_size": "vocab_size",
  "hidden_size": "hidden_size",
  "intermediate_size": "intermediate_size",
  "n_layers": "num_hidden_layers",
  "n_heads": "num_attention_heads",
  "n_kv_heads": "num_key_value_heads",
  "head_dim": "head_dim",
  "rope_theta": "rope_theta",
  "rms_norm_eps": "rms_norm_eps",
  "context_length": "max_position_embeddings",
  "tie_word_embeddings": "tie_word_embeddings",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads")


def safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
  """A safetensors file's tensors (name: {"dtype", "shape", "data_offsets"}) and where its data starts, each checked against the
  file before use: the header's length against the file and MAX_JSON_BYTES, each tensor's byte range against the data and,
  for a known dtype, against its shape."""
  where = f"safetensors file {str(file)!r}"
  with open_regular(file, "safetensors file") as f:
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
      raise BadInput(f"{where} is shorter than the 8 bytes that give its header's length")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
      raise BadInput(f"{where}: its header length {length} runs past the end of the file ({size} bytes; a truncated download?)")
    if length > MAX_JSON_BYTES:
      raise BadInput(f"{where}: its header is {length} bytes; at most {MAX_JSON_BYTES} are read")
    header = parse_json_object(f.read(length), f"the header of {where}")
  header.pop("__metadata__", None)
  data_bytes = size - 8 - length
  for name, entry in header.items():
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
      raise BadInput(f"{where}: tensor {shown(name)} must be an object with a dtype, got {shown(entry)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape):
      raise BadInput(f"{where}: tensor {shown(name)} has shape {shown(shape)}; expected a list of at most 8 sizes >= 0")
    if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
      or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
      raise BadInput(f"{where}: tensor {shown(name)} has data_offsets {shown(offsets)}; expected [start, end] within its {data_bytes} bytes of data")
    if entry["dtype"] in _ST_ITEM_BYTES and offsets[1] - offsets[0] != math.prod(shape) * _ST_ITEM_BYTES[entry["dtype"]]:
      raise BadInput(
        f"{where}: tensor {shown(name)} has {offsets[1] - offsets[0]} bytes of data, not the {list(shape)} {entry['dtype']} its header gives"
      )
  return header, 8 + length


@functools.lru_cache(maxsize=4)
def safetensors_index(directory: str) -> dict[str, tuple[Path, dict, int]]:
  """Tensor name: (file, header entry, offset of the file's data section), over every *.safetensors file in the directory."""
  index = {}
  for file in sorted(Path(directory).glob("*.safetensors")):
    header, data_start = safetensors_header(file)
    index.update({name: (file, entry, data_start) for name, entry in header.items()})
  return index


def read_weight_map(directory: Path) -> dict[str, str] | None:
  """model.safetensors.index.json's tensor -> file map (each file a *.safetensors name in the directory), or None for a
  checkpoint without one (a single file)."""
  path = directory / "model.safetensors.index.json"
  if not path.is_file():
    return None
  files = read_json(path, "safetensors index").get("weight_map")
  where = f"safetensors index {str(path)!r}"
  if not isinstance(files, dict):
    raise BadInput(f"{where} has no weight_map object")
  for name, file in files.items():
    if not isinstance(file, str) or not file.endswith(".safetensors") or "/" in file or "\\" in file or file.startswith("."):
      raise BadInput(f"{where}: tensor {shown(name)} is in {shown(file)}; expected the name of a .safetensors file beside it")
  return files


def _checkpoint_tensors(directory: Path):
  """The checkpoint's tensor names: its index's (model.safetensors.index.json), which also names those of weight files a node
  did not download (it fetches its layers' files only), or else its safetensors files' own."""
  files = read_weight_map(directory)
  return files if files is not None else safetensors_index(str(directory))


def hf_config(directory: Path) -> LlamaConfig:
  """The model's config from config.json, checked against the checkpoint's tensors (checked_config, check_tensors)."""
  c, where = read_json(directory / "config.json", "config.json"), f"config.json of {directory}"
  arch = c.get("model_type")
  if arch not in ARCHITECTURES or (arch == "llama" and (c.get("attention_bias") or c.get("mlp_bias"))):
    raise BadInput(f"{where}: model_type is not supported; expected one of {', '.join(ARCHITECTURES)} (a Llama without biases)")
  for field in _HF_REQUIRED:
    if c.get(_HF_KEYS[field]) is None:
      raise BadInput(f"{where} lacks {_HF_KEYS[field]}; expected a Hugging Face {arch} config")
  values = {field: c.get(key) for field, key in _HF_KEYS.items()} | {"architecture": arch}
  config = checked_config(values, _HF_KEYS, where, c.get("rope_scaling"))
  names = _checkpoint_tensors(directory)
  if LM_HEAD not in names:
    config = dataclasses.replace(config, tie_word_embeddings=True)
  present, quantization = safetensors_index(str(directory)), _mlx_quantization(directory)

  def shape_of(name: str):
    if name not in names:
      return name, False
    if name not in present:
      return name, None  # in a weight file not downloaded
    shape, module = tuple(present[name][1]["shape"]), name.removesuffix(".weight")
    if name.endswith(".weight") and f"{module}.scales" in present and shape:  # an MLX export's packed quants: 32 // bits a uint32
      shape = (*shape[:-1], shape[-1] * 32 // _mlx_settings(quantization, module, directory)[0])
    return name, shape

  check_tensors(config, f"model {directory}", shape_of)
  return config


def _mlx_quantization(directory: Path) -> dict:
  """config.json's `quantization` of an MLX export ({"group_size": 64, "bits": 4, per-module overrides...}); {} if none."""
  return read_json(directory / "config.json", "config.json").get("quantization") or {}


def _mlx_settings(quantization, module: str, directory: Path) -> tuple[int, int]:
  """The bits and group size an MLX export quantizes `module` with."""
  settings = quantization.get(module, quantization) if isinstance(quantization, dict) else None
  bits, group = (settings.get("bits"), settings.get("group_size")) if isinstance(settings, dict) else (None, None)
  if bits not in MLX_BITS or group not in MLX_GROUP_SIZES or isinstance(bits, bool) or isinstance(group, bool):
    raise BadInput(
      f"model {directory} quantizes {module} but config.json's quantization gives bits {shown(bits)} and group_size {shown(group)}; "
      f"expected bits in {MLX_BITS} and group_size in {MLX_GROUP_SIZES}"
    )
  return bits, group


def hf_tensor_reader(directory: Path, config: LlamaConfig):
  """read(name): the tensor `name` from the checkpoint's safetensors files, memory-mapped only while it is converted."""
  index = safetensors_index(str(directory))
  quantization = _mlx_quantization(directory)

  def raw(name: str) -> np.ndarray:
    if name not in index:
      raise BadInput(f"model {directory} lacks tensor {name}; expected a complete Hugging Face {config.architecture} checkpoint")
    file, entry, data_start = index[name]
    if entry["dtype"] not in _ST_DTYPES:
      raise BadInput(f"tensor {name} in {file} has dtype {entry['dtype']}; expected F32, F16, BF16 or an MLX-quantized U32")
    start, end = entry["data_offsets"]
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=data_start + start, shape=(end - start,)).view(_ST_DTYPES[entry["dtype"]])
    data = (data.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" else data
    return data.reshape(entry["shape"])

  def read(name: str) -> Weight:
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and f"{module}.scales" in index:
      bits, group = _mlx_settings(quantization, module, directory)
      packed = raw(name)
      scales, biases = (held(raw(f"{module}.{part}"), index[f"{module}.{part}"][1]["dtype"] in ("F16", "BF16")) for part in ("scales", "biases"))
      groups = (packed.shape[0], packed.shape[-1] * 32 // bits // group)
      if packed.ndim != 2 or scales.shape != groups or biases.shape != groups:
        raise BadInput(
          f"model {directory}: {module}'s scales and biases have shapes {list(scales.shape)}, {list(biases.shape)}; expected {list(groups)}"
        )
      return from_mlx(packed, scales, biases, bits, group)
    return held(raw(name), index[name][1]["dtype"] in ("F16", "BF16"))

  return read
