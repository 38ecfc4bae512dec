import pytest

from exo.base.chips import CHIPS, ChipSpec, capabilities_for_chip, chip_spec
from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops

APPLE_M = [f"Apple M{gen}{tier}" for gen in (1, 2, 3, 4) for tier in ("", " Pro", " Max")] + [f"Apple M{gen} Ultra" for gen in (1, 2, 3)]
APPLE_A = ["Apple A15 Bionic", "Apple A16 Bionic", "Apple A17 Pro", "Apple A18", "Apple A18 Pro"]


def bandwidth(chip: str) -> float:
  return CHIPS[chip].memory_bandwidth


def fp16(chip: str) -> float:
  return CHIPS[chip].flops.fp16


@pytest.mark.parametrize("name", ["apple m2 ultra", "  Apple   M2  Ultra ", "APPLE M2 ULTRA", "Apple\tM2\nUltra"])
def test_lookup_ignores_case_and_spacing(name):
  assert chip_spec(name) is CHIPS["Apple M2 Ultra"]


def test_lookup_matches_nvidia_smi_and_upstream_spellings():
  assert chip_spec("NVIDIA GeForce RTX 4090") is CHIPS["NVIDIA GeForce RTX 4090"]
  assert chip_spec("NVIDIA GEFORCE RTX 4090") is CHIPS["NVIDIA GeForce RTX 4090"]
  assert chip_spec("Tesla T4") == chip_spec("NVIDIA T4")


@pytest.mark.parametrize("name", ["", "   ", "Apple M5 Ultra", "Apple M2 Ultra 2", "RTX 4090", "NVIDIA GeForce RTX 4090 Laptop GPU"])
def test_unknown_chip_is_none(name):
  assert chip_spec(name) is None


def test_names_stay_distinct_after_normalising():
  normalised = [" ".join(name.split()).lower() for name in CHIPS]
  assert len(set(normalised)) == len(CHIPS)
  assert all(name == " ".join(name.split()) for name in CHIPS)


def test_capabilities_for_known_chip():
  caps = capabilities_for_chip("apple m2 ultra", 196608, model="Mac Studio")
  assert caps == DeviceCapabilities(
    model="Mac Studio", chip="apple m2 ultra", memory=196608, flops=DeviceFlops(27.2, 54.4, 108.8), memory_bandwidth=800
  )


def test_capabilities_for_unknown_chip_are_zero():
  caps = capabilities_for_chip("Potato 9000", 8192)
  assert caps.model == "Unknown Model" and caps.chip == "Potato 9000" and caps.memory == 8192
  assert caps.flops == DeviceFlops(0, 0, 0) and caps.memory_bandwidth == 0


def test_capabilities_round_trip_through_json_form():
  caps = capabilities_for_chip("NVIDIA GeForce RTX 3090", 24576, model="Linux Box")
  assert DeviceCapabilities.from_dict(caps.to_dict()) == caps


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_every_entry_is_plausible(name):
  spec = CHIPS[name]
  assert isinstance(spec, ChipSpec)
  assert 0 < spec.flops.fp32 <= spec.flops.fp16 <= spec.flops.int8
  assert spec.memory_bandwidth > 0
  # Nothing listed reaches 3 PFLOPS dense fp16 or 10 TB/s; a figure past that is a unit slip (sparse, GFLOPS, MB/s).
  assert spec.flops.fp16 < 3000 and spec.memory_bandwidth < 10000


def test_coverage():
  for name in APPLE_M + APPLE_A:
    assert name in CHIPS, name
  assert "Apple M4 Ultra" not in CHIPS  # no such chip
  assert sum(name.startswith(("NVIDIA", "Tesla")) for name in CHIPS) >= 10
  assert sum(name.startswith("AMD") for name in CHIPS) >= 5
  for name in (
    "NVIDIA A100 80GB PCIe",
    "NVIDIA H100 80GB HBM3",
    "NVIDIA L4",
    "NVIDIA Jetson AGX Orin",
    "AMD Instinct MI300X",
    "AMD Radeon RX 7900 XTX",
  ):
    assert name in CHIPS, name


@pytest.mark.parametrize("gen", [1, 2, 3, 4])
def test_apple_tiers_order_by_bandwidth_and_flops(gen):
  tiers = [f"Apple M{gen}", f"Apple M{gen} Pro", f"Apple M{gen} Max"] + ([f"Apple M{gen} Ultra"] if gen != 4 else [])
  bandwidths = [bandwidth(t) for t in tiers]
  assert bandwidths[0] < bandwidths[1] <= bandwidths[2]
  assert all(a < b for a, b in zip(bandwidths[2:], bandwidths[3:], strict=False))
  flops = [CHIPS[t].flops.fp32 for t in tiers]
  assert flops == sorted(flops) and len(set(flops)) == len(flops)


@pytest.mark.parametrize("gen", [1, 2])
def test_apple_max_and_ultra_double_up(gen):
  # Max doubles Pro's memory bus for M1 and M2; Ultra is two Max dies fused.
  assert bandwidth(f"Apple M{gen} Max") == 2 * bandwidth(f"Apple M{gen} Pro")
  assert bandwidth(f"Apple M{gen} Ultra") == 2 * bandwidth(f"Apple M{gen} Max")
  assert fp16(f"Apple M{gen} Ultra") == pytest.approx(2 * fp16(f"Apple M{gen} Max"), rel=0.02)


def test_apple_generations_improve():
  for tier in ("", " Pro", " Max"):
    assert CHIPS[f"Apple M4{tier}"].flops.fp32 > CHIPS[f"Apple M1{tier}"].flops.fp32
  assert bandwidth("Apple M4") > bandwidth("Apple M3") == bandwidth("Apple M2") > bandwidth("Apple M1")
  assert bandwidth("Apple M3 Pro") < bandwidth("Apple M2 Pro")  # M3 Pro narrowed the bus to 192 bits
  assert bandwidth("Apple A17 Pro") < bandwidth("Apple A18 Pro")


def test_apple_fp16_and_int8_follow_the_upstream_convention():
  for name in APPLE_M + APPLE_A:
    flops = CHIPS[name].flops
    assert flops.fp16 == pytest.approx(2 * flops.fp32) and flops.int8 == pytest.approx(2 * flops.fp16)


def test_gpu_family_ordering():
  assert fp16("NVIDIA GeForce RTX 4090") > fp16("NVIDIA GeForce RTX 3090")
  geforce_40 = ["4090", "4080", "4070 Ti", "4070", "4060 Ti"]
  assert [fp16(f"NVIDIA GeForce RTX {n}") for n in geforce_40] == sorted((fp16(f"NVIDIA GeForce RTX {n}") for n in geforce_40), reverse=True)
  geforce_30 = ["3090", "3080", "3070", "3060"]
  assert [bandwidth(f"NVIDIA GeForce RTX {n}") for n in geforce_30] == sorted(
    (bandwidth(f"NVIDIA GeForce RTX {n}") for n in geforce_30), reverse=True
  )
  # Same silicon, more HBM bandwidth on the SXM board and on H200.
  assert CHIPS["NVIDIA A100-SXM4-80GB"].flops == CHIPS["NVIDIA A100 80GB PCIe"].flops
  assert bandwidth("NVIDIA A100-SXM4-80GB") > bandwidth("NVIDIA A100 80GB PCIe") > bandwidth("NVIDIA A100-PCIE-40GB")
  assert bandwidth("NVIDIA H200") > bandwidth("NVIDIA H100 80GB HBM3") > bandwidth("NVIDIA H100 PCIe")
  assert fp16("NVIDIA H100 80GB HBM3") > fp16("NVIDIA A100 80GB PCIe") > fp16("NVIDIA L4") > fp16("NVIDIA T4")
  assert (
    bandwidth("AMD Instinct MI300X") > bandwidth("AMD Instinct MI250X") > bandwidth("AMD Radeon RX 7900 XTX") > bandwidth("AMD Radeon RX 7900 XT")
  )
  assert fp16("AMD Radeon RX 7900 XTX") > fp16("AMD Radeon RX 6900 XT") > fp16("AMD Radeon RX 6800 XT")


@pytest.mark.parametrize(
  "name, memory_bandwidth, fp32",
  [
    ("Apple M1", 68.25, 2.6),
    ("Apple M2 Ultra", 800, 27.2),
    ("Apple M3 Max", 400, None),
    ("Apple M3 Ultra", 819, None),
    ("Apple M4 Pro", 273, None),
    ("Apple M4 Max", 546, None),
    ("Apple A17 Pro", 51.2, None),
    ("NVIDIA GeForce RTX 4090", 1008, 82.6),
    ("NVIDIA GeForce RTX 3090", 936, 35.6),
    ("NVIDIA A100 80GB PCIe", 1935, 19.5),
    ("NVIDIA H100 80GB HBM3", 3350, None),
    ("AMD Instinct MI300X", 5300, None),
    ("AMD Radeon RX 7900 XTX", 960, 61.4),
  ],
)
def test_hand_checked_figures(name, memory_bandwidth, fp32):
  assert bandwidth(name) == memory_bandwidth
  if fp32 is not None:
    assert CHIPS[name].flops.fp32 == fp32


def test_hand_checked_tensor_figures():
  # Dense (non-sparse) datasheet figures: A100 312 fp16 / 624 int8, H100 SXM 989.4 fp16, RTX 4090 165.2 fp16 with fp32 accumulate.
  assert CHIPS["NVIDIA A100 80GB PCIe"].flops == DeviceFlops(19.5, 312, 624)
  assert fp16("NVIDIA H100 80GB HBM3") == 989.4
  assert fp16("NVIDIA GeForce RTX 4090") == 165.2
