"""A GGUF file's header (metadata and tensor directory) as plain Python values, without holding the file.

gguf-py's GGUFReader maps the whole file and builds numpy views for every part of every field: for a 49k-token vocabulary that
is over 160 MB and two seconds, more than the 4-bit model it describes. This reads the header once with struct (O(header size)
time, the header's size in memory), keeps the values, and leaves each tensor's data to be mapped only while it is loaded.
Values follow GGUFReader's `ReaderField.contents()`: scalars as Python values, arrays as lists. Little-endian files only.
Every count, length, dimension and offset is checked against the file (and the header against MAX_HEADER_BYTES) before it is
used, so a malformed file is a BadInput naming what is wrong, never a large allocation.
"""

import math
import mmap
import struct
from dataclasses import dataclass

import gguf
import numpy as np

from exo.base.errors import BadInput
from exo.base.files import open_regular

V = gguf.GGUFValueType
_SCALARS = {
  V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
  V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}  # fmt: skip
_NATIVE = {  # tensor types whose data is an array of one numpy type; every other type is raw blocks (uint8)
  gguf.GGMLQuantizationType.F32: np.float32,
  gguf.GGMLQuantizationType.F16: np.float16,
  gguf.GGMLQuantizationType.F64: np.float64,
  gguf.GGMLQuantizationType.I8: np.int8,
  gguf.GGMLQuantizationType.I16: np.int16,
  gguf.GGMLQuantizationType.I32: np.int32,
  gguf.GGMLQuantizationType.I64: np.int64,
}
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_HEADER_BYTES = 64 << 20  # metadata and tensor directory: a 256k-token vocabulary's header is under 16 MB
_MIN_FIELD_BYTES = 13  # a key's length, its type and a one-byte value
_MIN_TENSOR_BYTES = 28  # a name's length, the number of dimensions, one dimension, the type and the offset


@dataclass(frozen=True)
class GGUFTensor:
  """Where a tensor's data lies. `data` maps it afresh on each use: the pages it touches count towards the process's memory
  only while that array lives, so loading a shard never keeps the whole file resident."""

  path: str
  name: str
  tensor_type: gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF's order, innermost first
  n_elements: int
  n_bytes: int
  offset: int  # of the data, from the start of the file
  data_dtype: np.dtype
  data_shape: tuple[int, ...]  # rows first: (out, in) for a matrix, (rows, bytes per row) for quantized blocks

  @property
  def data(self) -> np.ndarray:
    return np.memmap(self.path, dtype=self.data_dtype, mode="r", offset=self.offset, shape=self.data_shape)


@dataclass(frozen=True)
class GGUFHeader:
  fields: dict  # key: value
  tensors: dict[str, GGUFTensor]


class _Cursor:
  """Reads the header front to back; every count and length is checked against the bytes left before anything is read."""

  def __init__(self, buffer, end: int):
    self.buffer, self.at, self.end = buffer, 0, end

  def need(self, n: int, what: str) -> None:
    if n > self.end - self.at:
      raise ValueError(f"{what} ({n} bytes at offset {self.at}) runs past the end of its header")

  def take(self, fmt: str):
    self.need(struct.calcsize(fmt), "a value")
    (value,) = struct.unpack_from(fmt, self.buffer, self.at)
    self.at += struct.calcsize(fmt)
    return value

  def string(self) -> str:
    n = self.take("<Q")
    self.need(n, "a string")
    self.at += n
    return bytes(self.buffer[self.at - n : self.at]).decode("utf-8", errors="replace")

  def value(self, kind: int):
    kind = _value_type(kind)
    if kind == V.STRING:
      return self.string()
    if kind != V.ARRAY:
      return self.take(_SCALARS[kind])
    item, count = _value_type(self.take("<I")), self.take("<Q")
    if item == V.ARRAY:
      raise ValueError("it holds an array of arrays, which GGUF readers do not support")
    self.need(count * (8 if item == V.STRING else struct.calcsize(_SCALARS[item])), f"an array of {count} values")
    if item in _SCALARS:  # a numeric array at once (a vocabulary's token types: 49k values)
      dtype = np.dtype(_SCALARS[item])
      values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.at)
      self.at += count * dtype.itemsize
      return values.tolist()
    return [self.string() for _ in range(count)]


def _value_type(kind: int) -> gguf.GGUFValueType:
  if kind not in V._value2member_map_:
    raise ValueError(f"it holds a value of unknown type {kind}")
  return V(kind)


def read_header(path: str) -> GGUFHeader:
  """The header of the GGUF file at `path`, or a BadInput naming the file if it is not one this can read."""
  with open_regular(path, "GGUF file") as f:
    try:
      with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        return _parse(path, buffer)
    except (OSError, ValueError, struct.error) as e:
      raise BadInput(f"{path} is not a readable GGUF file: {e}") from None


def _parse(path: str, buffer) -> GGUFHeader:
  """The header, checked against the file before anything is allocated for it: each count and length against the bytes left
  (of the file, and of MAX_HEADER_BYTES), each tensor's dimensions, type, alignment and data against the file's size."""
  cursor = _Cursor(buffer, min(len(buffer), MAX_HEADER_BYTES))
  if bytes(buffer[:4]) != b"GGUF":
    raise ValueError("it does not start with the GGUF magic")
  cursor.at = 4
  version, n_tensors, n_fields = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version} is not supported; expected 2 or 3 (little-endian)")
  cursor.need(n_fields * _MIN_FIELD_BYTES + n_tensors * _MIN_TENSOR_BYTES, f"a header of {n_fields} fields and {n_tensors} tensors")
  fields = {}
  for _ in range(n_fields):
    key = cursor.string()
    fields[key] = cursor.value(cursor.take("<I"))
  alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
  if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
    raise ValueError(f"general.alignment must be a power of two, got {alignment!r}")
  directory = []
  for _ in range(n_tensors):
    name, n_dims = cursor.string(), cursor.take("<I")
    if not 1 <= n_dims <= MAX_DIMS:
      raise ValueError(f"tensor {name!r} has {n_dims} dimensions; expected 1 to {MAX_DIMS}")
    dims = tuple(cursor.take("<Q") for _ in range(n_dims))
    kind, offset = cursor.take("<I"), cursor.take("<Q")
    if kind not in gguf.GGMLQuantizationType._value2member_map_ or gguf.GGMLQuantizationType(kind) not in gguf.GGML_QUANT_SIZES:
      raise ValueError(f"tensor {name!r} has unknown type {kind}")
    directory.append((name, dims, gguf.GGMLQuantizationType(kind), offset))
  data_start = -(-cursor.at // alignment) * alignment
  tensors = {}
  for name, dims, kind, offset in directory:
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    if min(dims) < 1 or dims[0] % block:
      raise ValueError(f"tensor {name!r} has shape {list(dims)}; expected sizes >= 1 and rows of whole {kind.name} blocks of {block}")
    n = math.prod(dims)
    n_bytes = n // block * block_bytes
    if offset % alignment or data_start + offset + n_bytes > len(buffer):
      raise ValueError(
        f"tensor {name!r} ({n_bytes} bytes at data offset {offset}) is misaligned or runs past the end of the file (a truncated download?)"
      )
    rows_first = tuple(reversed(dims))
    if kind in _NATIVE:
      dtype, shape = np.dtype(_NATIVE[kind]), rows_first
    else:
      dtype, shape = np.dtype(np.uint8), (*rows_first[:-1], rows_first[-1] // block * block_bytes)
    tensors[name] = GGUFTensor(path, name, kind, dims, n, n_bytes, data_start + offset, dtype, shape)
  return GGUFHeader(fields, tensors)
