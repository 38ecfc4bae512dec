import math
import tracemalloc

import pytest

from exo.base.chips import CHIPS
from exo.base.device_capabilities import DeviceFlops
from exo.orchestration import device_probe


def fake_device(monkeypatch, chip: str, memory_mb: float = 16384.0, tflops: float = 0.5, bandwidth: float = 20.0) -> list[str]:
  """Detection reports `chip`; measuring records its call and returns the given figures."""
  calls = []
  monkeypatch.setattr(device_probe, "detect_model_chip_memory", lambda: ("Test Box", chip, memory_mb))
  monkeypatch.setattr(device_probe, "measure_tflops", lambda seconds=1.0: calls.append("tflops") or tflops)
  monkeypatch.setattr(device_probe, "measure_memory_bandwidth", lambda seconds=1.0: calls.append("bandwidth") or bandwidth)
  return calls


def test_known_chip_gives_table_figures_without_measuring(monkeypatch):
  calls = fake_device(monkeypatch, "apple m2 ultra", memory_mb=196608)
  caps = device_probe.detect_device_capabilities()
  assert calls == []
  assert (caps.model, caps.chip, caps.memory) == ("Test Box", "apple m2 ultra", 196608)
  assert caps.flops == CHIPS["Apple M2 Ultra"].flops and caps.memory_bandwidth == 800


def test_unknown_chip_is_measured(monkeypatch):
  calls = fake_device(monkeypatch, "Potato 9000", tflops=0.5, bandwidth=20.0)
  caps = device_probe.detect_device_capabilities()
  assert sorted(calls) == ["bandwidth", "tflops"]
  assert caps.chip == "Potato 9000" and caps.memory == 16384
  assert caps.flops == DeviceFlops(0.5, 0.5, 0.5) and caps.memory_bandwidth == 20.0


def test_measure_flag_replaces_table_figures(monkeypatch):
  calls = fake_device(monkeypatch, "NVIDIA GeForce RTX 4090", tflops=0.5, bandwidth=20.0)
  caps = device_probe.detect_device_capabilities(measure=True)
  assert sorted(calls) == ["bandwidth", "tflops"]
  assert caps.flops == DeviceFlops(0.5, 0.5, 0.5) and caps.memory_bandwidth == 20.0


def test_overrides_win_and_are_not_measured(monkeypatch):
  calls = fake_device(monkeypatch, "Potato 9000")
  caps = device_probe.detect_device_capabilities(memory_mb=4096, tflops=10.0, memory_bandwidth=100.0)
  assert calls == []
  assert caps.memory == 4096 and caps.memory_bandwidth == 100.0
  assert caps.flops == DeviceFlops(fp32=5.0, fp16=10.0, int8=10.0)  # unknown chip: fp32 = fp16 / 2


def test_tflops_override_keeps_known_chip_fp32(monkeypatch):
  fake_device(monkeypatch, "Apple M2 Ultra")
  caps = device_probe.detect_device_capabilities(tflops=40.0)
  assert caps.flops == DeviceFlops(27.2, 40.0, 108.8) and caps.memory_bandwidth == 800


def test_one_override_measures_only_the_other(monkeypatch):
  calls = fake_device(monkeypatch, "Potato 9000", bandwidth=33.0)
  caps = device_probe.detect_device_capabilities(tflops=2.0)
  assert calls == ["bandwidth"]
  assert caps.flops.fp16 == 2.0 and caps.memory_bandwidth == 33.0


def test_detection_failure_does_not_raise(monkeypatch):
  def broken():
    raise RuntimeError("no sysctl here")

  monkeypatch.setattr(device_probe, "detect_model_chip_memory", broken)
  monkeypatch.setattr(device_probe, "measure_tflops", lambda seconds=1.0: 1 / 0)
  monkeypatch.setattr(device_probe, "measure_memory_bandwidth", lambda seconds=1.0: float("nan"))
  caps = device_probe.detect_device_capabilities()
  assert caps.chip == "Unknown Chip" and caps.model == "Unknown Model"
  assert caps.flops == DeviceFlops(0, 0, 0) and caps.memory_bandwidth == 0


@pytest.mark.parametrize(
  "line, expected", [("NVIDIA H100 80GB HBM3, 81559 MiB", ("NVIDIA H100 80GB HBM3", 81559.0)), ("Tesla T4, 15360", ("Tesla T4", 15360.0))]
)
def test_nvidia_smi_output_is_parsed(monkeypatch, line, expected):
  monkeypatch.setattr(device_probe.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
  monkeypatch.setattr(device_probe, "_run", lambda args: line + "\nsecond gpu, 1 MiB")
  assert device_probe._nvidia_gpu() == expected


def test_real_detection_returns_something():
  model, chip, memory = device_probe.detect_model_chip_memory()
  assert model and chip and memory >= 0


def traced_peak(measure) -> tuple[float, int]:
  """(what `measure()` returns, the peak bytes tracemalloc saw allocated while it ran); numpy reports its arrays to tracemalloc."""
  tracemalloc.start()
  try:
    value = measure()
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  return value, peak


def test_bandwidth_is_positive_with_buffers_beyond_caches_under_64_mb():
  bandwidth, peak = traced_peak(lambda: device_probe.measure_memory_bandwidth(0.2))
  assert 0 < bandwidth and math.isfinite(bandwidth)
  assert 2 * 16 * 2**20 <= peak < 64 * 2**20  # two buffers of 16 MB or more, larger than typical last-level caches


def test_tflops_is_positive_and_its_largest_matmuls_stay_under_64_mb(monkeypatch):
  monkeypatch.setattr(device_probe, "MAX_PRODUCT_SHARE", math.inf)  # grow to the largest size whatever this machine's speed
  monkeypatch.setattr(device_probe, "MIN_SAMPLES", 2)  # fewer samples, the same arrays
  tflops, peak = traced_peak(lambda: device_probe.measure_tflops(0.2))
  assert 0 < tflops and math.isfinite(tflops)
  assert 3 * device_probe.MAX_MATMUL_N**2 * 4 <= peak < 64 * 2**20


PEAK_TFLOPS = 1.0  # the emulated chip's matmul rate at n >= 1024; smaller products run slower, as on real BLAS
BANDWIDTH_GBS = 20.0


class BusyMachine:
  """A virtual clock for the probe's timings. It moves only by the emulated work, which runs 100 times slower until
  `busy_until` (other nodes measuring at the same time), each matmul waiting `product_wait` more (multithreaded BLAS waiting
  for a scheduler slice on a busy machine); some readings find that the process was descheduled (the time since the last
  reading lasted 100 times longer) or that the clock did not move (they repeat the last reading)."""

  def __init__(self, stalled=lambda read: False, frozen=lambda read: False, busy_until=0.0, product_wait=0.0, peak=PEAK_TFLOPS):
    self.now = self.shown = 0.0
    self.reads = 0
    self.stalled, self.frozen, self.busy_until, self.product_wait, self.peak = stalled, frozen, busy_until, product_wait, peak

  def work(self, seconds: float):
    slow = min(100 * seconds, max(0.0, self.busy_until - self.now))
    self.now += slow + seconds - slow / 100

  def perf_counter(self) -> float:
    self.reads += 1
    if self.frozen(self.reads):
      return self.shown
    if self.stalled(self.reads):
      self.now += 99 * (self.now - self.shown)
    self.shown = self.now
    return self.now


def emulate(monkeypatch, machine: BusyMachine):
  """The probe's clock is `machine`'s, and its matmuls and copies only advance it, at the emulated chip's speed."""

  def matmul(a, b, out):
    machine.work(2 * len(a) ** 3 / (machine.peak * min(1.0, len(a) / 1024) * 1e12))
    machine.now += machine.product_wait

  monkeypatch.setattr(device_probe, "perf_counter", machine.perf_counter)
  monkeypatch.setattr(device_probe.np, "matmul", matmul)
  monkeypatch.setattr(device_probe.np, "copyto", lambda dst, src: machine.work(2 * src.nbytes / (BANDWIDTH_GBS * 1e9)))


BUSY = {
  "idle": lambda: BusyMachine(),
  "descheduled now and then": lambda: BusyMachine(stalled=lambda read: read % 7 == 0),
  "busy at first": lambda: BusyMachine(busy_until=0.3),
  "a wait on every product": lambda: BusyMachine(product_wait=0.012),  # a 128 x 128 product then rates 0.00035 TFLOPS
  "clock standing still": lambda: BusyMachine(frozen=lambda read: read % 3 == 0),
  "both": lambda: BusyMachine(stalled=lambda read: read % 7 == 0, frozen=lambda read: read % 3 == 0),
}


@pytest.mark.parametrize("busy", BUSY)
def test_tflops_on_a_busy_machine_stays_within_a_factor_of_two(monkeypatch, busy):
  emulate(monkeypatch, BUSY[busy]())
  assert PEAK_TFLOPS / 2 < device_probe.measure_tflops() < PEAK_TFLOPS * 2


@pytest.mark.parametrize("busy", BUSY)
def test_bandwidth_on_a_busy_machine_stays_within_a_factor_of_two(monkeypatch, busy):
  emulate(monkeypatch, BUSY[busy]())
  assert BANDWIDTH_GBS / 2 < device_probe.measure_memory_bandwidth() < BANDWIDTH_GBS * 2


def test_both_measures_take_about_two_seconds_of_the_emulated_clock(monkeypatch):
  machine = BusyMachine()
  emulate(monkeypatch, machine)
  device_probe.measure_tflops()
  device_probe.measure_memory_bandwidth()
  assert 2.0 <= machine.now < 2.5


def test_a_slow_chip_stops_growing_before_one_product_outlasts_half_the_time(monkeypatch):
  machine = BusyMachine(peak=0.01)  # 10 GFLOPS: 0.2 s a product at n = 1024, 1.7 s at 2048
  emulate(monkeypatch, machine)
  assert 0.005 < device_probe.measure_tflops() < 0.02 and machine.now < 1.5


def test_a_sample_shorter_than_the_minimum_is_never_used(monkeypatch):
  # 1, 2 and 4 calls see the clock stand still, 8 calls last 8 ms, 16 calls are descheduled into 1.6 s though 16 ms of work
  machine = BusyMachine(frozen=lambda read: read <= 6, stalled=lambda read: read == 10)
  monkeypatch.setattr(device_probe, "perf_counter", machine.perf_counter)
  calls = []
  rates = device_probe._samples(lambda: calls.append(machine.work(0.001)), 1.0)  # 1 ms a call: 1000 calls a second
  assert next(rates) == pytest.approx(1000.0) and next(rates) == pytest.approx(1000.0)  # 32 calls, 32 ms, twice
  assert len(calls) == 1 + 2 + 4 + 8 + 16 + 32 + 32
