import math
import tracemalloc

import pytest

from exo.orchestration import device_probe
from exo.topology.chips import CHIPS
from exo.topology.device_capabilities import DeviceFlops


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
  monkeypatch.setattr(device_probe, "MIN_MATMUL_SECONDS", math.inf)  # grow to the largest size whatever this machine's speed
  tflops, peak = traced_peak(lambda: device_probe.measure_tflops(0.2))
  assert 0 < tflops and math.isfinite(tflops)
  assert 3 * device_probe.MAX_MATMUL_N**2 * 4 <= peak < 64 * 2**20
