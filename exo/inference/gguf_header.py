"""A GGUF file's header (metadata and tensor directory) as plain Python values, without holding the file.

gguf-py's GGUFReader maps the whole file and builds numpy views for every part of every field: for a 49k-token vocabulary that
is over 160 MB and two seconds, more than the 4-bit model it describes. This reads the header once with struct (O(header size)
time, the header's size in memory), keeps the values, and leaves each tensor's data to be mapped only while it is loaded.
Values follow GGUFReader's `ReaderField.contents()`: scalars as Python values, arrays as lists. Little-endian files only.
"""

import mmap
import struct
from dataclasses import dataclass

import gguf
import numpy as np

from exo.errors import BadInput

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
  def __init__(self, buffer):
    self.buffer, self.at = buffer, 0

  def take(self, fmt: str):
    (value,) = struct.unpack_from(fmt, self.buffer, self.at)
    self.at += struct.calcsize(fmt)
    return value

  def string(self) -> str:
    n = self.take("<Q")
    self.at += n
    return bytes(self.buffer[self.at - n : self.at]).decode("utf-8", errors="replace")

  def value(self, kind: int):
    kind = V(kind)
    if kind == V.STRING:
      return self.string()
    if kind != V.ARRAY:
      return self.take(_SCALARS[kind])
    item, count = V(self.take("<I")), self.take("<Q")
    if item in _SCALARS:  # a numeric array at once (a vocabulary's token types: 49k values)
      dtype = np.dtype(_SCALARS[item])
      values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.at)
      self.at += count * dtype.itemsize
      return values.tolist()
    return [self.value(item) for _ in range(count)]


def read_header(path: str) -> GGUFHeader:
  """The header of the GGUF file at `path`, or a BadInput naming the file if it is not one this can read."""
  try:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
      return _parse(path, buffer)
  except (OSError, ValueError, struct.error) as e:
    raise BadInput(f"{path} is not a readable GGUF file: {e}") from None


def _parse(path: str, buffer) -> GGUFHeader:
  cursor = _Cursor(buffer)
  if bytes(buffer[:4]) != b"GGUF":
    raise ValueError("it does not start with the GGUF magic")
  cursor.at = 4
  version, n_tensors, n_fields = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version} is not supported; expected 2 or 3 (little-endian)")
  fields = {}
  for _ in range(n_fields):
    key = cursor.string()
    fields[key] = cursor.value(cursor.take("<I"))
  directory = []
  for _ in range(n_tensors):
    name = cursor.string()
    dims = tuple(cursor.take("<Q") for _ in range(cursor.take("<I")))
    directory.append((name, dims, gguf.GGMLQuantizationType(cursor.take("<I")), cursor.take("<Q")))
  alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
  data_start = -(-cursor.at // alignment) * alignment
  tensors = {}
  for name, dims, kind, offset in directory:
    n = int(np.prod(dims)) if dims else 1
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rows_first = tuple(reversed(dims))
    if kind in _NATIVE:
      dtype, shape = np.dtype(_NATIVE[kind]), rows_first
    else:
      dtype, shape = np.dtype(np.uint8), (*rows_first[:-1], rows_first[-1] // block * block_bytes)
    tensors[name] = GGUFTensor(path, name, kind, dims, n, n // block * block_bytes, data_start + offset, dtype, shape)
  if tensors and max(t.offset + t.n_bytes for t in tensors.values()) > len(buffer):
    raise ValueError("its tensor data runs past the end of the file (a truncated download?)")
  return GGUFHeader(fields, tensors)
