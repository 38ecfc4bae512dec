"""ggml, the tensor library llama.cpp is built on, through ggml-python's ctypes bindings: the backend a node computes on, its
threads, and the few helpers every ggml user needs (metadata-only contexts, numpy in and out of backend tensors).

The backend is the best device ggml was built for: a GPU backend (Metal, CUDA, Vulkan: ggml-python built with
CMAKE_ARGS="-DGGML_METAL=ON", "-DGGML_CUDA=ON" or "-DGGML_VULKAN=ON") where one is present, else the CPU with `threads` threads.
"""

import ctypes
import os

import ggml
import numpy as np
import psutil

# ggml-python declares these as returning a C int, which cuts a 64-bit pointer in half: they return a buffer pointer.
ggml.ggml_backend_cpu_buffer_from_ptr.restype = ctypes.c_void_p

TYPE_NAMES = {getattr(ggml, n): n.removeprefix("GGML_TYPE_") for n in dir(ggml) if n.startswith("GGML_TYPE_") and n != "GGML_TYPE_COUNT"}


def default_threads() -> int:
  """The machine's physical cores (llama.cpp's default too): a second thread per core only contends for the same units."""
  return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class Backend:
  """A ggml backend and the allocator of its graphs' intermediate tensors. Not thread-safe: one thread computes on it."""

  def __init__(self, threads: int | None = None):
    self.threads = threads or default_threads()
    self.handle = ggml.ggml_backend_init_best()
    if not self.handle:
      raise RuntimeError("ggml found no backend to compute on")
    self.is_cpu = bool(ggml.ggml_backend_is_cpu(self.handle))
    if self.is_cpu:
      ggml.ggml_backend_cpu_set_n_threads(self.handle, self.threads)
    self.name = ggml.ggml_backend_name(self.handle).decode()
    self.allocator = ggml.ggml_gallocr_new(ggml.ggml_backend_get_default_buffer_type(self.handle))

  def allocate(self, graph) -> bool:
    """Place the graph's intermediate tensors in the allocator's buffer; whether the buffer grew for it. ggml places a graph's
    tensors once, on its first allocation, and keeps them there: when the buffer grows (it is freed and made again, larger),
    every OTHER graph allocated before points into freed memory and must not run again."""
    before = ggml.ggml_gallocr_get_buffer_size(self.allocator, 0)
    if not ggml.ggml_gallocr_alloc_graph(self.allocator, graph):
      raise MemoryError("ggml could not allocate a graph's intermediate tensors")
    return ggml.ggml_gallocr_get_buffer_size(self.allocator, 0) != before

  def run(self, graph) -> None:
    status = ggml.ggml_backend_graph_compute(self.handle, graph)
    if status != ggml.GGML_STATUS_SUCCESS:
      raise RuntimeError(f"ggml failed to compute a graph (status {status})")

  def free(self) -> None:
    if self.allocator:
      ggml.ggml_gallocr_free(self.allocator)
      ggml.ggml_backend_free(self.handle)
      self.allocator = self.handle = None


def metadata_context(tensors: int, graph_nodes: int = 0):
  """A ggml context that holds tensor descriptions (and a graph of `graph_nodes` nodes) but no data: the data lives in backend
  buffers. Free it with ggml_free."""
  size = ggml.ggml_tensor_overhead() * tensors + (ggml.ggml_graph_overhead_custom(graph_nodes, False) if graph_nodes else 0)
  ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
  if not ctx:
    raise MemoryError("ggml could not make a context")
  return ctx


def set_input(tensor, array: np.ndarray) -> None:
  """Copy a C-contiguous array into a backend tensor of exactly its size."""
  array = np.ascontiguousarray(array)
  if array.nbytes != ggml.ggml_nbytes(tensor):
    raise ValueError(f"an input of {array.nbytes} bytes for a tensor of {ggml.ggml_nbytes(tensor)}")
  ggml.ggml_backend_tensor_set(tensor, array.ctypes.data, 0, array.nbytes)


def get_output(tensor, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
  """A backend tensor's data as a new numpy array of `shape` (rows first: ggml's innermost dimension is numpy's last)."""
  out = np.empty(shape, dtype=dtype)
  if out.nbytes != ggml.ggml_nbytes(tensor):
    raise ValueError(f"an output of {out.nbytes} bytes from a tensor of {ggml.ggml_nbytes(tensor)}")
  ggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
  return out
