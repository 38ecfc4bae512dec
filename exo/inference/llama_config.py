"""A Llama-family model's config (Llama, or Qwen2: Llama plus biases on the Q, K and V projections), built from a file's raw
values only after each is checked: its type and range, and the fields against each other (checked_config); and the RoPE
frequencies it implies, Llama 3.1's and linear scaling included."""

import math
from dataclasses import dataclass

import numpy as np

from exo.base.errors import BadInput
from exo.base.model_spec import CONTEXT_LIMIT, MAX_LAYERS
from exo.inference.model_file_checks import positive_number, shown, whole_number

ARCHITECTURES = ("llama", "qwen2")
MAX_DIM = 1 << 20  # hidden, intermediate and head sizes, head counts: the largest published models' are under 64k
MAX_VOCAB = 1 << 24


@dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  rope_theta: float
  rms_norm_eps: float
  context_length: int
  tie_word_embeddings: bool
  rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (Llama 3.1+ "llama3" scaling); None: no scaling
  architecture: str = "llama"  # one of ARCHITECTURES
  attention_bias: bool = False  # biases on the Q, K and V projections (Qwen2)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """(head_dim/2,) float64 inverse frequencies for rotate-half RoPE, scaling applied."""
  inv_freq = config.rope_theta ** (-np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
  return inv_freq if config.rope_freq_factors is None else inv_freq / np.asarray(config.rope_freq_factors, dtype=np.float64)


def _given(values: dict, field: str, default):
  return default if values.get(field) is None else values[field]


def checked_config(values: dict, names: dict[str, str], where: str, rope_scaling=None) -> LlamaConfig:
  """A LlamaConfig from a file's raw values (keyed by LlamaConfig's fields; None: absent, for those with a default), each checked
  for type and range and against the others; `names` gives each field's name in the file, for the error; `rope_scaling` is a
  config.json's, or the GGUF's rope.scaling.* as one."""

  def whole(field: str, low: int, high: int, default=None) -> int:
    return whole_number(_given(values, field, default), names[field], where, low, high)

  hidden, heads = whole("hidden_size", 1, MAX_DIM), whole("n_heads", 1, MAX_DIM)
  if values.get("head_dim") is None and hidden % heads:
    raise BadInput(f"{where}: {names['hidden_size']} {hidden} is not a multiple of {names['n_heads']} {heads} (and no head size is given)")
  head_dim = whole("head_dim", 2, MAX_DIM, hidden // heads)
  if head_dim % 2:
    raise BadInput(f"{where}: the head size must be even (RoPE rotates pairs), got {head_dim}")
  kv_heads = whole("n_kv_heads", 1, heads, heads)
  if heads % kv_heads:
    raise BadInput(f"{where}: {names['n_heads']} {heads} is not a multiple of {names['n_kv_heads']} {kv_heads}")
  theta = positive_number(_given(values, "rope_theta", 10000.0), names["rope_theta"], where)
  tied = _given(values, "tie_word_embeddings", False)
  if not isinstance(tied, bool):
    raise BadInput(f"{where}: {names['tie_word_embeddings']} must be true or false, got {shown(tied)}")
  return LlamaConfig(
    vocab_size=whole("vocab_size", 1, MAX_VOCAB),
    hidden_size=hidden,
    intermediate_size=whole("intermediate_size", 1, MAX_DIM),
    n_layers=whole("n_layers", 1, MAX_LAYERS),
    n_heads=heads,
    n_kv_heads=kv_heads,
    head_dim=head_dim,
    rope_theta=theta,
    rms_norm_eps=positive_number(_given(values, "rms_norm_eps", 1e-6), names["rms_norm_eps"], where, below=1),
    context_length=whole("context_length", 1, CONTEXT_LIMIT, 2048),
    tie_word_embeddings=tied,
    rope_freq_factors=rope_scaling_factors(rope_scaling, theta, head_dim, where),
    architecture=values["architecture"],
    attention_bias=values.get("attention_bias", values["architecture"] == "qwen2"),
  )


def rope_scaling_factors(scaling, theta: float, head_dim: int, where: str = "config.json") -> tuple[float, ...] | None:
  """Per-frequency divisors of inv_freq for a config.json `rope_scaling`, computed as transformers and llama.cpp do; a BadInput
  naming the field for a kind not supported or a value out of range."""
  if scaling is None:
    return None
  if not isinstance(scaling, dict):
    raise BadInput(f"{where}: rope_scaling must be an object or null, got {shown(scaling)}")
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in ("default", "none"):
    return None
  if kind not in ("linear", "llama3"):
    raise BadInput(f"{where}: rope_scaling type {shown(kind)} is not supported; expected 'llama3', 'linear' or none")
  factor = positive_number(scaling.get("factor", 8.0 if kind == "llama3" else None), "rope_scaling.factor", where)
  n = head_dim // 2
  if kind == "linear":
    return (factor,) * n
  low = positive_number(scaling.get("low_freq_factor", 1.0), "rope_scaling.low_freq_factor", where)
  high = positive_number(scaling.get("high_freq_factor", 4.0), "rope_scaling.high_freq_factor", where)
  if not high > low:
    raise BadInput(f"{where}: rope_scaling.high_freq_factor ({high:g}) must be above rope_scaling.low_freq_factor ({low:g})")
  old_context = whole_number(
    scaling.get("original_max_position_embeddings", 8192), "rope_scaling.original_max_position_embeddings", where, 1, CONTEXT_LIMIT
  )
  factors = []
  for freq in theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
    wavelen = 2 * math.pi / freq
    if wavelen < old_context / high:
      factors.append(1.0)
    elif wavelen > old_context / low:
      factors.append(factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return tuple(factors)
