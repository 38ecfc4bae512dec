"""The tensors of a Llama-family model: their Hugging Face names (global layer indices), llama.cpp's GGUF name for each, the
parts of one decoder layer, the shape of every tensor a config implies, and the check that a file holds them all."""

from exo.base.errors import BadInput
from exo.inference.llama_config import LlamaConfig

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
GGUF_PARTS = {  # Hugging Face layer part: llama.cpp's name for it
  "input_layernorm.weight": "attn_norm.weight",
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.o_proj.weight": "attn_output.weight",
  "post_attention_layernorm.weight": "ffn_norm.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
  "self_attn.q_proj.bias": "attn_q.bias",
  "self_attn.k_proj.bias": "attn_k.bias",
  "self_attn.v_proj.bias": "attn_v.bias",
}
LAYER_PARTS = tuple(GGUF_PARTS)[:9]  # every family's
ATTENTION_BIASES = tuple(GGUF_PARTS)[9:]  # Qwen2's besides
GGUF_GLOBALS = {EMBED: "token_embd.weight", NORM: "output_norm.weight", LM_HEAD: "output.weight"}


def layer_parts(config: LlamaConfig) -> tuple[str, ...]:
  """The tensors of one decoder layer of this model."""
  return LAYER_PARTS + (ATTENTION_BIASES if config.attention_bias else ())


def layer_key(layer: int, part: str) -> str:
  return f"model.layers.{layer}.{part}"


def gguf_name(name: str) -> str:
  """llama.cpp's name for the tensor of Hugging Face name `name`."""
  if name in GGUF_GLOBALS:
    return GGUF_GLOBALS[name]
  layer, part = name.removeprefix("model.layers.").split(".", 1)
  return f"blk.{layer}.{GGUF_PARTS[part]}"


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor the model's config implies, by Hugging Face name, with its shape (rows first)."""
  c, attn, kv = config, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
  parts = {
    "input_layernorm.weight": (c.hidden_size,),
    "self_attn.q_proj.weight": (attn, c.hidden_size),
    "self_attn.k_proj.weight": (kv, c.hidden_size),
    "self_attn.v_proj.weight": (kv, c.hidden_size),
    "self_attn.o_proj.weight": (c.hidden_size, attn),
    "post_attention_layernorm.weight": (c.hidden_size,),
    "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
    "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
    "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    "self_attn.q_proj.bias": (attn,),
    "self_attn.k_proj.bias": (kv,),
    "self_attn.v_proj.bias": (kv,),
  }
  shapes = {EMBED: (c.vocab_size, c.hidden_size), NORM: (c.hidden_size,)}
  if not c.tie_word_embeddings:
    shapes[LM_HEAD] = (c.vocab_size, c.hidden_size)
  shapes.update({layer_key(i, part): parts[part] for i in range(c.n_layers) for part in layer_parts(c)})
  return shapes


def check_tensors(config: LlamaConfig, where: str, shape_of) -> None:
  """Every tensor the config implies is in the file with its shape: `shape_of(name)` gives the file's name for it and its shape
  (False: not in the file; None: not known here, as for a weight file not downloaded)."""
  for name, shape in tensor_shapes(config).items():
    file_name, found = shape_of(name)
    if found is False:
      raise BadInput(f"{where} lacks tensor {file_name}; expected a complete {config.architecture} model of {config.n_layers} layers")
    if found is not None and tuple(found) != shape:
      raise BadInput(f"{where}: tensor {file_name} has shape {list(found)}, but its config implies {list(shape)}")
