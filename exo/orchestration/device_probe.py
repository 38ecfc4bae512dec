"""What this node is: its model, chip and memory from the OS, its TFLOPS and memory bandwidth from the chip table or, for a chip
the table does not know, from a short numpy benchmark. All the I/O of describing a device lives here; exo/topology stays pure.

Detection never raises: whatever cannot be read becomes "Unknown ..." or 0 (unknown), logged at info.
"""

import logging
import math
import platform
import shutil
import subprocess
import time

import numpy as np
import psutil

from exo.topology.chips import chip_spec
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 2.0
MEASURE_SECONDS = 1.0  # per benchmark; both together stay within about two seconds
UNKNOWN_MODEL = "Unknown Model"
UNKNOWN_CHIP = "Unknown Chip"


def _run(args: list[str]) -> str | None:
  """stdout of a short command, stripped, or None if it is missing, fails or hangs."""
  try:
    result = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError) as e:
    log.info("could not run %s: %s", args[0], e)
    return None
  if result.returncode != 0:
    log.info("%s exited with %d: %s", " ".join(args), result.returncode, result.stderr.strip())
    return None
  return result.stdout.strip() or None


def system_memory_mb() -> float:
  """Total RAM in MB (2**20 bytes), 0 if unreadable."""
  try:
    return psutil.virtual_memory().total / 2**20
  except Exception as e:  # psutil raises platform-specific errors; a missing figure must not stop the node
    log.info("could not read system memory: %s", e)
    return 0.0


def _nvidia_gpu() -> tuple[str, float] | None:
  """(name, memory MB) of the first NVIDIA GPU, or None without nvidia-smi or a GPU."""
  if shutil.which("nvidia-smi") is None:
    return None
  out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
  if out is None:
    return None
  name, _, memory = out.splitlines()[0].rpartition(",")
  try:
    memory_mb = float(memory.strip().split()[0])  # "81559 MiB"
  except (ValueError, IndexError):
    log.info("could not parse nvidia-smi memory %r", memory)
    memory_mb = 0.0
  return (name.strip(), memory_mb) if name.strip() else None


def _linux_cpu_name() -> str | None:
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
          return value.strip()
  except OSError as e:
    log.info("could not read /proc/cpuinfo: %s", e)
  return platform.processor() or None


def detect_model_chip_memory() -> tuple[str, str, float]:
  """(model, chip, memory MB) as the OS reports them. On a Linux box with an NVIDIA GPU the chip is the GPU and memory its VRAM."""
  system = platform.system()
  if system == "Darwin":
    chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or UNKNOWN_CHIP
    model = _run(["sysctl", "-n", "hw.model"]) or UNKNOWN_MODEL
    return model, chip, system_memory_mb()
  if system == "Linux":
    gpu = _nvidia_gpu()
    if gpu is not None:
      return "Linux Box", gpu[0], gpu[1]
    return "Linux Box", _linux_cpu_name() or UNKNOWN_CHIP, system_memory_mb()
  return f"{system or 'Unknown'} Box", platform.processor() or UNKNOWN_CHIP, system_memory_mb()


def measure_tflops(seconds: float = MEASURE_SECONDS) -> float:
  """Best fp32 TFLOPS of square numpy matmuls over about `seconds`; the size grows until one product takes 10 ms or more."""
  deadline = time.perf_counter() + seconds
  n, best = 128, 0.0
  rng = np.random.default_rng(0)
  while True:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
    start = time.perf_counter()
    np.matmul(a, b, out=out)
    elapsed = time.perf_counter() - start
    if elapsed > 0:
      best = max(best, 2 * n**3 / elapsed / 1e12)
    if elapsed >= 0.01 or n >= 4096 or time.perf_counter() >= deadline:
      break
    n *= 2
  while time.perf_counter() < deadline:
    start = time.perf_counter()
    np.matmul(a, b, out=out)
    elapsed = time.perf_counter() - start
    if elapsed > 0:
      best = max(best, 2 * n**3 / elapsed / 1e12)
  return best


def measure_memory_bandwidth(seconds: float = MEASURE_SECONDS, size_mb: int = 256) -> float:
  """Best GB/s (1e9 B/s) of np.copyto between two arrays larger than the caches, counting the bytes read and the bytes written."""
  deadline = time.perf_counter() + seconds
  try:
    available = psutil.virtual_memory().available
  except Exception:  # psutil raises platform-specific errors
    available = 0
  if available:
    size_mb = max(8, min(size_mb, int(available / 2**20 / 8)))
  src = np.ones(size_mb * 2**20 // 4, dtype=np.float32)
  dst = np.zeros_like(src)  # both touched before timing, so no page fault is timed
  best = 0.0
  while True:
    start = time.perf_counter()
    np.copyto(dst, src)
    elapsed = time.perf_counter() - start
    if elapsed > 0:
      best = max(best, 2 * src.nbytes / elapsed / 1e9)
    if time.perf_counter() >= deadline:
      return best


def _safe(measure, what: str) -> float:
  try:
    value = float(measure())
  except Exception as e:  # MemoryError or a broken BLAS must not stop the node; the figure becomes unknown
    log.info("could not measure %s: %s", what, e)
    return 0.0
  return value if math.isfinite(value) and value > 0 else 0.0


def detect_device_capabilities(
  measure: bool = False, memory_mb: float | None = None, tflops: float | None = None, memory_bandwidth: float | None = None
) -> DeviceCapabilities:
  """This node's capabilities: the chip table's figures for a known chip; for an unknown chip, or with `measure`, the node's own
  speed measured with numpy in about two seconds (a CPU figure: numpy has no fast fp16, so fp16 = int8 = the fp32 measured).

  Overrides (CLI --memory-mb, --tflops, --memory-bandwidth) replace what was detected, and what they give is never measured.
  `tflops` sets fp16, the figure the planner uses; fp32 stays the table's if the chip is known, else becomes tflops / 2, and int8
  likewise stays the table's or becomes tflops.
  """
  try:
    model, chip, detected_memory = detect_model_chip_memory()
  except Exception as e:  # detection is best effort on every OS; an odd one must still get a node up
    log.info("could not detect this device: %s", e)
    model, chip, detected_memory = UNKNOWN_MODEL, UNKNOWN_CHIP, system_memory_mb()
  spec = chip_spec(chip)
  flops = spec.flops if spec is not None else DeviceFlops()
  bandwidth = spec.memory_bandwidth if spec is not None else 0.0
  if spec is None:
    log.info("chip %r is not in the chip table; measuring this node's speed", chip)
  if spec is None or measure:
    if tflops is None:
      measured = _safe(measure_tflops, "TFLOPS")
      flops = DeviceFlops(measured, measured, measured)
      log.info("measured %.3f fp32 TFLOPS with numpy on the CPU (used as fp16 and int8 too)", measured)
    if memory_bandwidth is None:
      bandwidth = _safe(measure_memory_bandwidth, "memory bandwidth")
      log.info("measured %.1f GB/s memory bandwidth with numpy on the CPU", bandwidth)
  if tflops is not None:
    flops = DeviceFlops(flops.fp32 if spec is not None else tflops / 2, tflops, flops.int8 if spec is not None else tflops)
  caps = DeviceCapabilities(
    model=model,
    chip=chip,
    memory=float(detected_memory if memory_mb is None else memory_mb),
    flops=flops,
    memory_bandwidth=float(bandwidth if memory_bandwidth is None else memory_bandwidth),
  )
  log.info("device capabilities: %s", caps.to_dict())
  return caps
