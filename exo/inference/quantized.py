"""Weights at the precision their file stores them: affine-quantized matrices, and 16-bit matrices kept 16-bit.

A QuantizedMatrix is MLX's affine quantization, which GGUF's simple block types map onto exactly (groups of 32 along a row):
  Q4_0: value = d * (q - 8)    -> scale d, bias -8 d, q = the 4-bit quant
  Q4_1: value = d * q + m      -> scale d, bias m
  Q8_0: value = d * q (signed) -> scale d, bias -128 d, q = the int8 quant + 128
The scales and biases stay float16 as in the file, so Q4_1 is held in exactly its file size (5 bits a weight) and Q4_0 / Q8_0 in
two bytes more per 32 weights. Other GGUF types (K-quants, I-quants) are dequantized and held as float16.

Packing: row r's element c sits in byte c * bits // 8 of the row, at bit (c * bits) % 8, lowest bits first. Viewed as uint32 (on
a little-endian machine) that is exactly the layout of mx.quantize, so MLX uses the bytes as they are.
"""

from dataclasses import dataclass

import gguf
import numpy as np

from exo.base.errors import BadInput

GGUF_GROUP = 32
_F16_MAX = float(np.finfo(np.float16).max)
_BLOCKS = {  # GGUF type: (bytes per block of 32, bits held)
  gguf.GGMLQuantizationType.Q4_0: (18, 4),
  gguf.GGMLQuantizationType.Q4_1: (20, 4),
  gguf.GGMLQuantizationType.Q8_0: (34, 8),
}
KEPT_QUANTIZED = frozenset(_BLOCKS)


@dataclass(frozen=True, eq=False)
class QuantizedMatrix:
  """A (rows, cols) matrix: w[r, c] = scales[r, c // group_size] * q[r, c] + biases[r, c // group_size], q unsigned."""

  packed: np.ndarray  # uint8 (rows, cols * bits // 8)
  scales: np.ndarray  # float16 or float32 (rows, cols // group_size)
  biases: np.ndarray  # same dtype and shape as scales
  bits: int  # 4 or 8
  group_size: int

  @property
  def shape(self) -> tuple[int, int]:
    return self.packed.shape[0], self.packed.shape[1] * 8 // self.bits

  @property
  def nbytes(self) -> int:
    return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

  def quants(self) -> np.ndarray:
    """q as uint8 (rows, cols)."""
    if self.bits == 8:
      return self.packed
    return np.stack([self.packed & 0xF, self.packed >> 4], axis=-1).reshape(self.shape)

  def dequantize(self) -> np.ndarray:
    """float32 (rows, cols), computed in float32."""
    rows, cols = self.shape
    q = self.quants().reshape(rows, cols // self.group_size, self.group_size).astype(np.float32)
    scales, biases = self.scales.astype(np.float32)[..., None], self.biases.astype(np.float32)[..., None]
    return (q * scales + biases).reshape(rows, cols)

  def take_rows(self, index) -> "QuantizedMatrix":
    """The rows `index` (an integer array, or anything numpy indexes rows with) as a new matrix."""
    return QuantizedMatrix(self.packed[index], self.scales[index], self.biases[index], self.bits, self.group_size)


Weight = np.ndarray | QuantizedMatrix


def weight_nbytes(w: Weight) -> int:
  return int(w.nbytes)


def as_float32(w: Weight) -> np.ndarray:
  """Any held weight as float32, for references and the rare op that needs it."""
  return w.dequantize() if isinstance(w, QuantizedMatrix) else np.asarray(w, dtype=np.float32)


def pack_quants(q: np.ndarray, bits: int) -> np.ndarray:
  """uint8 quants (rows, cols), each < 2**bits, packed as QuantizedMatrix.packed."""
  if bits == 8:
    return np.ascontiguousarray(q, dtype=np.uint8)
  return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def from_gguf_blocks(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> QuantizedMatrix:
  """A Q4_0, Q4_1 or Q8_0 tensor's raw blocks (uint8 (rows, bytes per row), as GGUFReader hands them) without dequantizing."""
  block_bytes, bits = _BLOCKS[qtype]
  rows = data.shape[0]
  blocks = np.asarray(data, dtype=np.uint8).reshape(rows, -1, block_bytes)
  d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
  if qtype == gguf.GGMLQuantizationType.Q8_0:
    q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    bias = d * np.float16(-128)
  else:
    nibbles = blocks[..., 4:] if qtype == gguf.GGMLQuantizationType.Q4_1 else blocks[..., 2:]
    q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1)  # GGUF byte j holds quants j and j + 16 of its block
    bias = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if qtype == gguf.GGMLQuantizationType.Q4_1 else d * np.float16(-8)
  return QuantizedMatrix(pack_quants(q.reshape(rows, -1), bits), d.copy(), bias.copy(), bits, GGUF_GROUP)


def from_mlx(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> QuantizedMatrix:
  """A matrix as mx.quantize stores it (uint32 weight, scales, biases), as MLX community exports ship it."""
  if bits not in (4, 8):
    raise BadInput(f"{bits}-bit MLX quantization is not supported; expected 4 or 8 bits")
  packed = np.ascontiguousarray(weight, dtype="<u4").view(np.uint8)
  if packed.shape[1] * 8 // bits != scales.shape[1] * group_size:
    raise BadInput(f"quantized weight of shape {weight.shape} does not match scales {scales.shape} at {bits} bits, group {group_size}")
  if scales.dtype not in (np.float16, np.float32) or biases.dtype != scales.dtype:
    raise BadInput(f"quantization scales and biases must both be float16 or float32, got {scales.dtype} and {biases.dtype}")
  return QuantizedMatrix(packed, scales, biases, bits, group_size)


def half(w: np.ndarray) -> np.ndarray:
  """float16 when every value fits float16's range (16-bit files stay 16-bit), else float32."""
  w = np.asarray(w)
  if w.dtype == np.float16:
    return np.array(w)  # a copy: never a view of a mapped file
  w32 = w.astype(np.float32)
  return w32.astype(np.float16) if np.all(np.abs(w32) <= _F16_MAX) else w32


def held(w: np.ndarray, sixteen_bit: bool) -> np.ndarray:
  """A dense tensor at the precision it is held: vectors float32, 16-bit matrices float16 where they fit, float32 ones as they are."""
  if w.ndim == 1:
    return np.asarray(w, dtype=np.float32)
  return half(w) if sixteen_bit else np.array(w, dtype=np.float32)
