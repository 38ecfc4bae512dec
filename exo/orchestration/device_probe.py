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
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from time import perf_counter

import numpy as np
import psutil

from exo.base.chips import capabilities_for_chip, chip_spec
from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 2.0
MEASURE_SECONDS = 1.0  # per benchmark; both together stay within about two seconds
MIN_SAMPLES = 5  # timed samples per figure, even past its time; the figure is their median, never one sample
MIN_SAMPLE_SECONDS = 0.02  # a sample repeats its operation until it lasts this long; a shorter sample is never used
MAX_PRODUCT_SHARE = 0.5  # matmul sizes grow while one product would take at most this share of the measuring time
MAX_MATMUL_N = 2048  # three float32 2048 x 2048 matrices: 48 MB, under the probe's 64 MB memory budget
BANDWIDTH_BUFFER_MB = 24  # each of the two copy buffers: 48 MB together, more than typical last-level caches
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


def _samples(run: Callable[[], object], work: float) -> Iterator[float]:
  """Rates (work per second, `work` per call) of successive samples of run(), each repeating it often enough to last
  MIN_SAMPLE_SECONDS even at the fastest rate per call seen so far. A shorter sample (a quick call, a coarse clock or one that did
  not move) is dropped and retried with twice the repeats, which later samples keep; a sample made long only by a scheduler
  wait is dropped too, so waits cannot pick the samples that count. No rate comes from a few microseconds that one wait can
  swell a thousandfold, and none is 0 or infinite."""
  repeats, fastest = 1, math.inf  # fastest: the least seconds per call seen
  while True:
    start = perf_counter()
    for _ in range(repeats):
      run()
    elapsed = perf_counter() - start
    if elapsed > 0:
      fastest = min(fastest, elapsed / repeats)
    if elapsed > 0 and repeats * fastest >= MIN_SAMPLE_SECONDS:
      yield work * repeats / elapsed
    else:
      repeats *= 2


def _median(rates: Iterator[float], deadline: float, taken: list[float]) -> float:
  """Median of `taken` and further `rates` drawn until `deadline`, MIN_SAMPLES in all at least: slow samples from a busy
  machine are outliers unless they are most of them."""
  while len(taken) < MIN_SAMPLES or perf_counter() < deadline:
    taken.append(next(rates))
  return statistics.median(taken)


def measure_tflops(seconds: float = MEASURE_SECONDS, max_n: int = MAX_MATMUL_N) -> float:
  """Median fp32 TFLOPS over about `seconds` of square numpy matmuls (_samples of repeated products) at a size n doubling
  from 256 up to `max_n` while one product of the next size would take at most MAX_PRODUCT_SHARE of `seconds`.

  A product's time is taken at the better of two samples (one slow sample cannot stop the growth) and modelled as a fixed wait
  plus work growing as n^3, so the next size's is this one's plus 8 times the growth since the last size (this one's again
  after the first size). On a busy machine multithreaded BLAS waits for a scheduler slice on every call: a small product then
  costs about as much as a large one, and only a large one measures the chip. The figure is the median of the last size's
  samples. Only one size's matrices exist at a time: 48 MB at n = 2048."""
  deadline = perf_counter() + seconds
  rng = np.random.default_rng(0)
  n, previous = 256, 0.0  # previous: seconds per product at the last size
  while True:
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.ones((n, n), dtype=np.float32)  # written, so no page fault is timed
    flops = 2 * n**3 / 1e12
    rates = _samples(partial(np.matmul, a, b, out=out), flops)
    taken = [next(rates), next(rates)]
    product = flops / max(taken)
    following = min(8 * product, max(product, product + 8 * (product - previous))) if previous else product
    if 2 * n > max_n or following > MAX_PRODUCT_SHARE * seconds:
      return _median(rates, deadline, taken)
    del a, b, out, rates  # freed before the next size is allocated, so two sizes never coexist
    n, previous = 2 * n, product


def measure_memory_bandwidth(seconds: float = MEASURE_SECONDS, size_mb: int = BANDWIDTH_BUFFER_MB) -> float:
  """Median GB/s (1e9 B/s) over about `seconds` of np.copyto between two `size_mb` arrays (_samples of repeated copies),
  counting the bytes read and the bytes written. The two buffers together (48 MB by default) exceed typical last-level caches."""
  deadline = perf_counter() + seconds
  src = np.ones(size_mb * 2**20 // 4, dtype=np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # warm-up: touches every page of dst, so no page fault is timed
  return _median(_samples(partial(np.copyto, dst, src), 2 * src.nbytes / 1e9), deadline, [])


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
  known = chip_spec(chip) is not None
  caps = capabilities_for_chip(chip, float(detected_memory if memory_mb is None else memory_mb), model)
  if not known:
    log.info("chip %r is not in the chip table; measuring this node's speed", chip)
  if not known or measure:
    if tflops is None:
      measured = _safe(measure_tflops, "TFLOPS")
      caps = replace(caps, flops=DeviceFlops(measured, measured, measured))
      log.info("measured %.3f fp32 TFLOPS with numpy on the CPU (used as fp16 and int8 too)", measured)
    if memory_bandwidth is None:
      caps = replace(caps, memory_bandwidth=_safe(measure_memory_bandwidth, "memory bandwidth"))
      log.info("measured %.1f GB/s memory bandwidth with numpy on the CPU", caps.memory_bandwidth)
  if tflops is not None:
    flops = caps.flops
    caps = replace(caps, flops=DeviceFlops(flops.fp32 if known else tflops / 2, tflops, flops.int8 if known else tflops))
  if memory_bandwidth is not None:
    caps = replace(caps, memory_bandwidth=float(memory_bandwidth))
  log.info("device capabilities: %s", caps.to_dict())
  return caps
