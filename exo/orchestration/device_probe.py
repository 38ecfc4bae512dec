"""What this node is: its model, chip and memory from the OS, its TFLOPS and memory bandwidth from the chip table or, for a chip
the table does not know, from a short numpy benchmark. All the I/O of describing a device lives here; exo/topology stays pure.

Detection never raises: whatever cannot be read becomes "Unknown ..." or 0 (unknown), logged at info.
"""

import logging
import math
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

import numpy as np
import psutil

from exo.topology.chips import chip_spec
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 2.0
MEASURE_SECONDS = 1.0  # per benchmark; both together stay within about two seconds
MIN_REPEATS = 5  # timed repeats per benchmark even past its time, so the median is never one sample
MIN_MATMUL_SECONDS = 0.01  # matmul sizes grow at least until one product takes this long
MATMUL_GROWTH_GAIN = 1.1  # ... and past it while doubling the size changes the rate by this factor or more
MAX_MATMUL_N = 2048  # three float32 2048 x 2048 matrices: 48 MB, under the probe's 64 MB memory budget
BANDWIDTH_BUFFER_MB = 24  # each of the two copy buffers: 48 MB together, more than typical last-level caches
COPIES_PER_REPEAT = 4  # copies timed together, so one repeat lasts milliseconds even at hundreds of GB/s
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


def _median_of_repeats(run_once: Callable[[], float], seconds: float, samples: list[float]) -> float:
  """Median of `samples` and `run_once()` repeated over about `seconds`, MIN_REPEATS values at least: robust to a busy machine's
  slow outliers."""
  deadline = time.perf_counter() + seconds
  while len(samples) < MIN_REPEATS or time.perf_counter() < deadline:
    samples.append(run_once())
  return statistics.median(samples)


def _matmul_tflops(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> float:
  """TFLOPS of one timed a @ b into out (square, n x n); 0 if the clock did not move."""
  start = time.perf_counter()
  np.matmul(a, b, out=out)
  elapsed = time.perf_counter() - start
  return 2 * a.shape[0] ** 3 / elapsed / 1e12 if elapsed > 0 else 0.0


def measure_tflops(seconds: float = MEASURE_SECONDS, max_n: int = MAX_MATMUL_N) -> float:
  """Median fp32 TFLOPS of square numpy matmuls over about `seconds`, at a size n that doubles from 128 until one product takes
  MIN_MATMUL_SECONDS and the rate has levelled off (best of two products within MATMUL_GROWTH_GAIN of the last size's), or n
  reaches `max_n`. Only one size's matrices exist at a time: 48 MB at n = 2048. Growing past jumpy rates keeps a busy machine's
  scheduler waits, which swamp small products, from setting the figure."""
  deadline = time.perf_counter() + seconds
  rng = np.random.default_rng(0)
  n, previous = 128, 0.0
  while True:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
    rates = [_matmul_tflops(a, b, out), _matmul_tflops(a, b, out)]
    rate = max(rates)
    long_enough = rate * 1e12 * MIN_MATMUL_SECONDS <= 2 * n**3
    if n * 2 > max_n or (long_enough and previous / MATMUL_GROWTH_GAIN <= rate < previous * MATMUL_GROWTH_GAIN):
      break
    del a, b, out  # freed before the next size is allocated, so two sizes never coexist
    n, previous = n * 2, rate
  return _median_of_repeats(lambda: _matmul_tflops(a, b, out), deadline - time.perf_counter(), rates)


def measure_memory_bandwidth(seconds: float = MEASURE_SECONDS, size_mb: int = BANDWIDTH_BUFFER_MB) -> float:
  """Median GB/s (1e9 B/s) over about `seconds` of np.copyto between two `size_mb` arrays, counting the bytes read and the bytes
  written. Each repeat copies COPIES_PER_REPEAT times; the two buffers together (48 MB by default) exceed typical last-level caches."""
  src = np.ones(size_mb * 2**20 // 4, dtype=np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # warm-up: touches every page of dst, so no page fault is timed

  def copy_gbs() -> float:
    start = time.perf_counter()
    for _ in range(COPIES_PER_REPEAT):
      np.copyto(dst, src)
    elapsed = time.perf_counter() - start
    return 2 * src.nbytes * COPIES_PER_REPEAT / elapsed / 1e9 if elapsed > 0 else 0.0

  return _median_of_repeats(copy_gbs, seconds, [])


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
