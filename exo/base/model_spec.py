"""What the planner needs to know of a model, derived from its architecture or read from the model-spec JSON."""

from dataclasses import asdict, dataclass
from pathlib import Path

from exo.base.device_capabilities import non_negative_number, reject_unknown_keys, unicode_text
from exo.base.errors import BadInput
from exo.base.topology import parse_json, read_text

MAX_CONTEXT = 8192  # tokens of context a plan reserves KV for unless capped lower (--max-context): docs/DESIGN.md v2.1
CONTEXT_LIMIT = 1 << 24  # the longest context a model spec may declare
MAX_LAYERS = 10_000  # the largest published models have a few hundred; more is a mistake the planner would take minutes over
FLOAT32_BYTES = 4  # the engines send hidden states between stages and keep the KV cache in float32; the final norm is counted as float32


@dataclass(frozen=True)
class ModelSpec:
  """A transformer's figures (docs/DESIGN.md section 2): per layer, bytes of weights, FLOPs per token, hidden-state bytes sent per token
  and KV bytes for one request at `context_tokens`; and the bytes of the token embedding (first stage) and of the final norm and
  output head (last stage). `file_bytes`: the size of the one file a node fetches whole to serve any layer of the model (a GGUF
  file); 0 when a node fetches the files of its own layers."""

  id: str
  n_layers: int
  layer_bytes: float
  layer_flops: float
  activation_bytes: float
  kv_bytes_per_layer: float = 0.0
  embed_bytes: float = 0.0
  head_bytes: float = 0.0
  tied_embeddings: bool = False
  context_tokens: int = MAX_CONTEXT
  file_bytes: float = 0.0

  def to_dict(self) -> dict:
    out = asdict(self)
    if not self.file_bytes:
      del out["file_bytes"]
    return out

  def default_context(self) -> int:
    """The context a plan reserves KV for unless capped: the model's own, at most MAX_CONTEXT tokens."""
    return min(self.context_tokens, MAX_CONTEXT)

  @staticmethod
  def from_dict(data: dict, where: str = "model spec") -> "ModelSpec":
    if not isinstance(data, dict):
      raise BadInput(f"{where} must be a JSON object, got {type(data).__name__}")
    required = {"id", "n_layers", "layer_bytes", "layer_flops", "activation_bytes"}
    sizes = ("layer_bytes", "layer_flops", "activation_bytes", "kv_bytes_per_layer", "embed_bytes", "head_bytes", "file_bytes")
    reject_unknown_keys(data, {*required, *sizes, "tied_embeddings", "context_tokens"}, where)
    for key in sorted(required):
      if key not in data:
        raise BadInput(f"{where} is missing {key!r}")
    if not isinstance(data["id"], str) or not data["id"]:
      raise BadInput(f"{where}.id must be a non-empty string, got {data['id']!r}")
    unicode_text(data["id"], f"{where}.id")
    n_layers = data["n_layers"]
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= MAX_LAYERS:
      raise BadInput(f"{where}.n_layers must be a whole number from 1 to {MAX_LAYERS}, got {n_layers!r}")
    tied = data.get("tied_embeddings", False)
    if not isinstance(tied, bool):
      raise BadInput(f"{where}.tied_embeddings must be true or false, got {tied!r}")
    context = data.get("context_tokens", MAX_CONTEXT)
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= CONTEXT_LIMIT:
      raise BadInput(f"{where}.context_tokens must be a whole number of tokens from 1 to {CONTEXT_LIMIT}, got {context!r}")
    spec = ModelSpec(
      id=data["id"],
      n_layers=n_layers,
      tied_embeddings=tied,
      context_tokens=context,
      **{k: non_negative_number(data.get(k, 0), f"{where}.{k}") for k in sizes},
    )
    if spec.layer_bytes <= 0:  # every layer holds weights; the head's share of a stage is measured in layers of them
      raise BadInput(f"{where}.layer_bytes must be > 0, got {spec.layer_bytes!r}")
    return spec

  @staticmethod
  def load(path: str | Path) -> "ModelSpec":
    return ModelSpec.from_dict(parse_json(read_text(path, "model spec file"), str(path)), f"model spec {str(path)!r}")


@dataclass(frozen=True)
class Architecture:
  """Llama-style decoder shape. `bits_per_weight` includes quantisation scales (4-bit with fp16 scale+bias per 64 weights = 4.5);
  `embed_bits_per_weight` is the token embedding's when a build stores it at another precision (None: the layers' precision)."""

  n_layers: int
  hidden_size: int
  intermediate_size: int
  n_heads: int
  n_kv_heads: int
  bits_per_weight: float
  context_length: int
  vocab_size: int
  tied_embeddings: bool
  embed_bits_per_weight: float | None = None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.n_heads

  def layer_params(self) -> int:
    """Weights of one decoder layer: q and o projections, k and v projections (grouped-query), gated MLP, two norms."""
    h, kv_width = self.hidden_size, self.n_kv_heads * self.head_dim
    attention = 2 * h * h + 2 * h * kv_width
    mlp = 3 * h * self.intermediate_size
    return attention + mlp + 2 * h

  def spec(self, model_id: str) -> ModelSpec:
    """The model's figures; the output matrix is counted at the embedding's precision, as tied builds share that one matrix."""
    params = self.layer_params()
    embed_bits = self.bits_per_weight if self.embed_bits_per_weight is None else self.embed_bits_per_weight
    vocab_matrix_bytes = self.vocab_size * self.hidden_size * embed_bits / 8
    return ModelSpec(
      id=model_id,
      n_layers=self.n_layers,
      layer_bytes=params * self.bits_per_weight / 8,
      layer_flops=2.0 * params,
      activation_bytes=float(self.hidden_size * FLOAT32_BYTES),
      kv_bytes_per_layer=float(2 * self.n_kv_heads * self.head_dim * self.context_length * FLOAT32_BYTES),
      embed_bytes=vocab_matrix_bytes,
      head_bytes=self.hidden_size * FLOAT32_BYTES + vocab_matrix_bytes,
      tied_embeddings=self.tied_embeddings,
      context_tokens=self.context_length,
    )
