"""The ggml graph of one engine call over a resident shard (ggml_shard): the rows of all its requests go through each matrix
product together (the weights are read once for the batch), and each request's rows attend to its own KV cache at its own
positions.

Per layer: h = x + Attention(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)); attention is ggml's flash attention over the
request's KV cache (float16, as llama.cpp's), computed in float32. A Llama's RoPE rotates adjacent pairs (its Q and K rows are
in llama.cpp's order), a Qwen2's halves.

Everything that changes from step to step (token ids or hidden states, positions, the cache rows written, the attention masks,
which rows the head reads) is an input tensor written before each run, so a built graph serves every call with the same caches,
rows, windows and head rows.
"""

from dataclasses import dataclass

import ggml
import numpy as np

from exo.inference.ggml_library import metadata_context
from exo.inference.ggml_shard import GGMLShard, KVCache
from exo.inference.llama_layout import EMBED, GGUF_GLOBALS, LM_HEAD, NORM


@dataclass(eq=False)
class Graph:
  """A built graph and its input tensors; `caches` keeps the caches it writes alive while it exists."""

  ctx: int
  graph: object
  inputs: object  # token ids (N,) int32 on the first shard, else hidden states (hidden, N) float32
  positions: object  # (N,) int32
  cache_rows: list  # per request (T_i,) int64: the cache cells its rows write
  masks: list  # per request (window_i, T_i padded) float16: 0 where a row may attend, -inf elsewhere
  head_rows: object | None  # (R,) int32: the rows whose logits the head computes, on the last shard
  output: object
  caches: list[KVCache]

  def __del__(self):
    ggml.ggml_free(self.ctx)


def _padded(rows: int) -> int:
  """A mask's rows: ggml's flash attention reads masks padded to GGML_KQ_MASK_PAD rows."""
  pad = ggml.GGML_KQ_MASK_PAD
  return -(-rows // pad) * pad


def attention_mask(start: int, rows: int, window: int) -> np.ndarray:
  """Row i (the position start + i) may attend to cells 0..start + i; padding rows to none."""
  cells = np.arange(window)
  allowed = cells[None, :] <= start + np.arange(_padded(rows))[:, None]
  allowed[rows:] = False
  return np.where(allowed, np.float16(0), np.float16(-np.inf))


def _new_input(ctx: int, kind: int, *shape: int):
  tensor = {1: ggml.ggml_new_tensor_1d, 2: ggml.ggml_new_tensor_2d}[len(shape)](ctx, kind, *shape)
  ggml.ggml_set_input(tensor)
  return tensor


class _Builder:
  """The ggml calls that build one graph's layers: its context and graph, and the positions every layer's RoPE reads."""

  def __init__(self, model: GGMLShard, ctx: int, graph, positions, n: int):
    self.model, self.ctx, self.graph, self.positions, self.n = model, ctx, graph, positions, n
    c = model.config
    self.mode = ggml.GGML_ROPE_TYPE_NORMAL if c.architecture == "llama" else ggml.GGML_ROPE_TYPE_NEOX
    self.scale = 1.0 / c.head_dim**0.5

  def rope(self, y):
    c = self.model.config
    return ggml.ggml_rope_ext(
      self.ctx, y, self.positions, self.model.rope_factors, c.head_dim, self.mode, c.context_length, c.rope_theta, 1.0, 0.0, 1.0, 0.0, 0.0
    )

  def project(self, h, name: str, layer: int):
    t = self.model.tensors
    y = ggml.ggml_mul_mat(self.ctx, t[f"blk.{layer}.{name}.weight"], h)
    bias = t.get(f"blk.{layer}.{name}.bias")
    return y if bias is None else ggml.ggml_add(self.ctx, y, bias)

  def norm(self, y, weight):
    return ggml.ggml_mul(self.ctx, ggml.ggml_rms_norm(self.ctx, y, self.model.config.rms_norm_eps), weight)

  def layer(self, x, j: int, layer: int, requests: list[tuple]):
    """Decoder layer `layer` (the shard's j-th) over the hidden states x (hidden, N)."""
    ctx, t, c, n = self.ctx, self.model.tensors, self.model.config, self.n
    hd, kv_heads = c.head_dim, c.n_kv_heads
    h = self.norm(x, t[f"blk.{layer}.attn_norm.weight"])
    q = self.rope(ggml.ggml_reshape_3d(ctx, self.project(h, "attn_q", layer), hd, c.n_heads, n))
    k = ggml.ggml_reshape_2d(ctx, self.rope(ggml.ggml_reshape_3d(ctx, self.project(h, "attn_k", layer), hd, kv_heads, n)), hd * kv_heads, n)
    v = self.project(h, "attn_v", layer)
    x = ggml.ggml_add(ctx, x, self.project(self.attention(j, q, k, v, requests), "attn_output", layer))
    h = self.norm(x, t[f"blk.{layer}.ffn_norm.weight"])
    gated = ggml.ggml_swiglu_split(ctx, self.project(h, "ffn_gate", layer), self.project(h, "ffn_up", layer))
    return ggml.ggml_add(ctx, x, self.project(gated, "ffn_down", layer))

  def attention(self, j: int, q, k, v, requests: list[tuple]):
    """Each request's rows of q over its own cache in the shard's j-th layer, after its rows of k and v are written into the
    cells its cache rows input names; (hidden, N), the requests' rows one after another."""
    ctx, c = self.ctx, self.model.config
    hd, heads, kv_heads = c.head_dim, c.n_heads, c.n_kv_heads
    attention, first = None, 0
    for cache, r, window, written, mask in requests:
      for source, target in ((k, cache.k), (v, cache.v)):
        nb = target.contents.nb
        cells = ggml.ggml_view_2d(ctx, target, hd * kv_heads, cache.context, nb[1], j * nb[2])
        step = ggml.ggml_view_2d(ctx, source, hd * kv_heads, r, source.contents.nb[1], first * source.contents.nb[1])
        ggml.ggml_build_forward_expand(self.graph, ggml.ggml_set_rows(ctx, cells, step, written))
      keys, values = (ggml.ggml_view_3d(ctx, m, hd, window, kv_heads, m.contents.nb[1], hd * 2, j * m.contents.nb[2]) for m in (cache.k, cache.v))
      query = ggml.ggml_view_3d(ctx, q, hd, heads, r, q.contents.nb[1], q.contents.nb[2], first * q.contents.nb[2])
      out = ggml.ggml_flash_attn_ext(ctx, ggml.ggml_permute(ctx, query, 0, 2, 1, 3), keys, values, mask, self.scale, 0.0, 0.0)
      ggml.ggml_flash_attn_ext_set_prec(out, ggml.GGML_PREC_F32)
      out = ggml.ggml_reshape_2d(ctx, out, hd * heads, r)
      attention = out if attention is None else ggml.ggml_concat(ctx, attention, out, 1)
      first += r
    return attention


def build(model: GGMLShard, caches: list[KVCache], rows: list[int], windows: list[int], head_rows: int) -> Graph:
  """The graph of one call: request i's rows[i] rows (in order, one after another) at the cache cells its inputs name,
  attending over the first windows[i] cells of caches[i]; on the last shard, logits for `head_rows` rows the input names.
  O(layers x requests) ggml calls."""
  c, shard, t = model.config, model.shard, model.tensors
  n = sum(rows)
  nodes = 64 + shard.get_layer_count() * (32 + 16 * len(caches))  # a layer makes about 22 nodes, and 13 more per request
  ctx = metadata_context(nodes, nodes)
  graph = ggml.ggml_new_graph_custom(ctx, nodes, False)
  if shard.is_first_layer():
    inputs = _new_input(ctx, ggml.GGML_TYPE_I32, n)
    x = ggml.ggml_get_rows(ctx, t[GGUF_GLOBALS[EMBED]], inputs)
  else:
    inputs = x = _new_input(ctx, ggml.GGML_TYPE_F32, c.hidden_size, n)
  positions = _new_input(ctx, ggml.GGML_TYPE_I32, n)
  cache_rows = [_new_input(ctx, ggml.GGML_TYPE_I64, r) for r in rows]
  masks = [_new_input(ctx, ggml.GGML_TYPE_F16, w, _padded(r)) for w, r in zip(windows, rows)]
  builder = _Builder(model, ctx, graph, positions, n)
  requests = list(zip(caches, rows, windows, cache_rows, masks))
  for j, layer in enumerate(range(shard.start_layer, shard.end_layer + 1)):
    x = builder.layer(x, j, layer, requests)
  selected = None
  if shard.is_last_layer():
    selected = _new_input(ctx, ggml.GGML_TYPE_I32, head_rows)
    head = t[GGUF_GLOBALS[EMBED] if c.tie_word_embeddings else GGUF_GLOBALS[LM_HEAD]]
    x = ggml.ggml_mul_mat(ctx, head, builder.norm(ggml.ggml_get_rows(ctx, x, selected), t[GGUF_GLOBALS[NORM]]))
  ggml.ggml_set_output(x)
  ggml.ggml_build_forward_expand(graph, x)
  return Graph(ctx, graph, inputs, positions, cache_rows, masks, selected, x, list(caches))
