"""Matrix products in tinygrad with the weights as the model file holds them (exo.inference.quantized): quantized matrices as
packed 4- or 8-bit quants plus a scale and a bias per group, 16-bit ones as float16, float32 ones as float32.

A decode step dequantizes inside each product's kernel (mask or shift the quants, multiply by the group's scale, add its bias,
multiply by the input, accumulate), so no float32 copy of a weight exists. A prompt chunk, whose rows would each dequantize the
weights again, dequantizes the matrix once into a float32 temporary of the step. Products accumulate into LANES interleaved
partial sums, then across them: the CPU overlaps independent adds, where a single running sum would wait on each one. A batch
of decode rows runs BATCH_ROWS rows to a product kernel, each row's sums in the order of a lone row's (batch_matmul).
"""

from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes

from exo.inference.quantized import QuantizedMatrix, Weight

LANES = 16  # partial sums per output of a matrix product
BATCH_ROWS = 4  # rows of a batched decode step per product kernel
_F32 = dtypes.float32


@dataclass(frozen=True, eq=False)
class Matrix:
  """An (out, in) weight on the device as its file holds it. bits 32 or 16: tensors = (w,) float32 or float16. bits 8 or 4:
  tensors = (packed uint8 (out, in * bits / 8), scales, biases (out, in / group)), w = scale * q + bias per group."""

  tensors: tuple[Tensor, ...]
  bits: int
  shape: tuple[int, int]
  group: int = 0


def to_device(w: Weight, device: str) -> Matrix:
  if isinstance(w, QuantizedMatrix):
    arrays, bits, group = (w.packed, w.scales, w.biases), w.bits, w.group_size
  else:
    arrays, bits, group = (w,), 16 if w.dtype == np.float16 else 32, 0
  tensors = tuple(Tensor(np.ascontiguousarray(a), device=device).realize() for a in arrays)
  return Matrix(tensors, bits, w.shape, group)


def host_view(m: Matrix) -> Weight:
  """A CPU matrix's device memory as numpy arrays, without copying (valid while the tensors live)."""
  arrays = [np.frombuffer(t.uop.buffer.as_memoryview(allow_zero_copy=True), dtype=t.dtype.fmt).reshape(t.shape) for t in m.tensors]
  return QuantizedMatrix(*arrays, m.bits, m.group) if m.bits in (4, 8) else arrays[0]


def _half_to_float(w: Tensor) -> Tensor:
  """float16 -> float32 with integer ops: the exponent field moves up 13 bits and the result is scaled by 2**(127 - 15), which
  is exact for every finite value, subnormals included. Unlike a per-element conversion instruction it vectorizes. O(size)."""
  bits = w.bitcast(dtypes.uint16).cast(dtypes.uint32)
  return (((bits & 0x8000) << 16) | ((bits & 0x7FFF) << 13)).bitcast(_F32) * 2.0**112


def _affine(m: Matrix, q: Tensor) -> Tensor:
  """Quants q (out, in / group, k) of a quantized matrix as float32 values: scale * q + bias with the group's scale and bias."""
  _, scales, biases = m.tensors
  return q.cast(_F32) * scales.cast(_F32).unsqueeze(-1) + biases.cast(_F32).unsqueeze(-1)


def _nibbles(m: Matrix) -> tuple[Tensor, Tensor]:
  """A 4-bit matrix's even and odd columns as float32, each (out, in / group, group / 2): byte b of a row holds column 2b in
  its low nibble and 2b + 1 in its high one."""
  out, n = m.shape
  p = m.tensors[0].reshape(out, n // m.group, m.group // 2)
  return _affine(m, p & 15), _affine(m, p >> 4)


def _dequantized(m: Matrix) -> Tensor:
  """The (out, in) float32 matrix as a lazy expression of its held tensors (nothing is computed until a kernel reads it)."""
  out, n = m.shape
  if m.bits == 32:
    return m.tensors[0]
  if m.bits == 16:
    return _half_to_float(m.tensors[0])
  if m.bits == 8:
    return _affine(m, m.tensors[0].reshape(out, n // m.group, m.group)).reshape(out, n)
  return Tensor.stack(*_nibbles(m), dim=-1).reshape(out, n)


def matmul(x: Tensor, m: Matrix, fused: bool = False, paired: bool = False) -> Tensor:
  """x (T, in) @ W.T -> (T, out) float32. O(T * out * in).
  One row (a decode step), or `fused`: W is dequantized inside the product's kernel and the products are summed into LANES
  interleaved partial sums, then across them, so the CPU overlaps independent adds (one running sum would wait on each). A 4-bit
  matrix multiplies x's even and odd columns by its low and high nibbles, as interleaving the nibbles costs a select per element.
  `paired` (rows of a batch): an 8- or 32-bit matrix likewise adds a lane's products two at a time, the compiler then vectorizes
  the rows' lanes; tinygrad renders lane + (a + b) as lane + a + b, which C adds in the order of one at a time, so the sums are
  bit-identical to unpaired ones. Not a 16-bit one: tinygrad takes its conversion's power-of-two scale out of an unpaired sum
  only, so paired sums would round differently.
  Several rows: W is first dequantized once into a float32 temporary, as each row would dequantize it again."""
  t, (out, n) = x.shape[0], m.shape
  if t > 1 and not fused:
    return (x @ _dequantized(m).contiguous().T).contiguous()
  if m.bits == 4:
    low, high = _nibbles(m)
    columns = x.reshape(t, 1, n // m.group, m.group // 2, 2)
    products, n = columns[..., 0] * low + columns[..., 1] * high, n // 2
  elif paired and m.bits != 16 and n % (2 * LANES) == 0:
    columns, w = x.reshape(t, 1, n // (2 * LANES), 2, LANES), _dequantized(m).reshape(out, n // (2 * LANES), 2, LANES)
    products, n = columns[..., 0, :] * w[..., 0, :] + columns[..., 1, :] * w[..., 1, :], n // 2
  else:
    products = x.reshape(t, 1, n) * _dequantized(m)
  return lane_sum(products.reshape(t, out, n)).contiguous()  # else a consumer's kernel recomputes it for each of its outputs


def batch_matmul(x: Tensor, m: Matrix) -> Tensor:
  """x (B, in) @ W.T -> (B, out) float32 for B requests' decode steps, each row's result bit-identical to matmul of that row
  alone. O(B * out * in) operations, W read once per BATCH_ROWS rows.
  The rows run BATCH_ROWS to a product kernel (the last group padded with zero rows), which dequantizes each weight once for
  all of them; given more rows, tinygrad's heuristics also unroll outputs and the partial sums spill out of the registers
  (slower per row than one row alone). A 4-bit matrix reads x from a copy that holds, per quantization group, its even columns
  and then its odd ones: each lane's inputs are adjacent, so the compiler vectorizes the rows' lanes (interleaved columns leave
  it scalar, 2-3 times slower). Both change only where values sit, not which products are summed in which order."""
  b, n = x.shape[0], m.shape[1]
  rows = -(-b // BATCH_ROWS) * BATCH_ROWS
  x = x.pad(((0, rows - b), (0, 0)))
  if m.bits == 4:
    x = x.reshape(rows, n // m.group, m.group // 2, 2).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2).reshape(rows, n)
  else:
    x = x.contiguous()
  return Tensor.cat(*[matmul(x[i : i + BATCH_ROWS], m, fused=True, paired=True) for i in range(0, rows, BATCH_ROWS)])[:b]


def lane_sum(products: Tensor) -> Tensor:
  """The sum over the last axis, in LANES interleaved partial sums and then across them (when the axis divides evenly)."""
  n = products.shape[-1]
  lanes = LANES if n % LANES == 0 else 1
  return products.reshape(*products.shape[:-1], n // lanes, lanes).sum(-2).sum(-1)
