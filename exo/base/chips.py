"""Peak TFLOPS and memory bandwidth of known chips, keyed by the name the OS reports, so a node can describe itself from its chip name."""

from dataclasses import dataclass

from exo.base.device_capabilities import DeviceCapabilities, DeviceFlops


@dataclass(frozen=True)
class ChipSpec:
  """A chip's peak throughput and its memory bandwidth in GB/s (1e9 bytes/s)."""

  flops: DeviceFlops
  memory_bandwidth: float


def _apple(fp32: float, bandwidth: float) -> ChipSpec:
  # fp16 = 2 x fp32 and int8 = 2 x fp16 as upstream exo tabulates Apple GPUs; the hardware runs fp16 at about the fp32 rate,
  # but decode is bandwidth bound, so the planner's ranking of Apple chips does not hinge on it.
  return ChipSpec(DeviceFlops(fp32, 2 * fp32, 4 * fp32), bandwidth)


def _gpu(fp32: float, fp16: float, int8: float, bandwidth: float) -> ChipSpec:
  return ChipSpec(DeviceFlops(fp32, fp16, int8), bandwidth)


# Vendor spec sheets and whitepapers. fp32: GPU shader (non-tensor) peak. fp16: Apple 2 x fp32 (see _apple); NVIDIA dense
# (non-sparse) tensor-core fp16 with fp32 accumulate, the mode frameworks use, which GeForce cards run at half their fp16-accumulate
# rate; AMD dense fp16 (WMMA/packed on Radeon, matrix cores on Instinct). int8: dense tensor/matrix TOPS (RDNA3: same rate as fp16;
# RDNA2: dot4 at 2 x fp16). Where a chip comes in binned variants the figures are for the top one.
CHIPS: dict[str, ChipSpec] = {
  # Apple M series: GPU cores x 128 lanes x 2 FLOPs x clock. M1/M2 are Apple's own TFLOPS; Apple gives none for M3/M4, so those use
  # the reported GPU clocks (M3 1.398 GHz, M4 1.578 GHz). Top variants: M1 8/16/32/64-core GPU, M2 10/19/38/76, M3 10/18/40/80,
  # M4 10/20/40.
  "Apple M1": _apple(2.6, 68.25),
  "Apple M1 Pro": _apple(5.2, 200),
  "Apple M1 Max": _apple(10.4, 400),
  "Apple M1 Ultra": _apple(21.0, 800),
  "Apple M2": _apple(3.6, 100),
  "Apple M2 Pro": _apple(6.8, 200),
  "Apple M2 Max": _apple(13.6, 400),
  "Apple M2 Ultra": _apple(27.2, 800),
  "Apple M3": _apple(3.58, 100),
  "Apple M3 Pro": _apple(6.44, 150),
  "Apple M3 Max": _apple(14.31, 400),  # 40-core GPU; the 30-core bin has 300 GB/s
  "Apple M3 Ultra": _apple(28.63, 819),
  "Apple M4": _apple(4.04, 120),
  "Apple M4 Pro": _apple(8.08, 273),
  "Apple M4 Max": _apple(16.16, 546),  # 40-core GPU; the 32-core bin has 410 GB/s
  # Apple A series (iPhone, iPad): same formula; GPU cores 5/5/6/5/6, clocks 1.338/1.398/1.398/1.45/1.45 GHz.
  "Apple A15 Bionic": _apple(1.71, 34.1),  # 5-core GPU (iPhone 13 Pro); the 4-core bin has 1.37 TFLOPS
  "Apple A16 Bionic": _apple(1.79, 51.2),
  "Apple A17 Pro": _apple(2.15, 51.2),
  "Apple A18": _apple(1.86, 60),
  "Apple A18 Pro": _apple(2.23, 60),
  # NVIDIA GeForce, as nvidia-smi names them (10 GB RTX 3080).
  "NVIDIA GeForce RTX 4090": _gpu(82.6, 165.2, 660.6, 1008),
  "NVIDIA GeForce RTX 4080 SUPER": _gpu(52.2, 104.4, 418.0, 736),
  "NVIDIA GeForce RTX 4080": _gpu(48.7, 97.5, 389.9, 716.8),
  "NVIDIA GeForce RTX 4070 Ti SUPER": _gpu(44.1, 88.2, 352.8, 672),
  "NVIDIA GeForce RTX 4070 Ti": _gpu(40.1, 80.2, 320.7, 504.2),
  "NVIDIA GeForce RTX 4070 SUPER": _gpu(35.5, 71.0, 283.9, 504.2),
  "NVIDIA GeForce RTX 4070": _gpu(29.1, 58.3, 233.2, 504.2),
  "NVIDIA GeForce RTX 4060 Ti": _gpu(22.1, 44.1, 176.6, 288),
  "NVIDIA GeForce RTX 4060": _gpu(15.1, 30.2, 121.0, 272),
  "NVIDIA GeForce RTX 3090 Ti": _gpu(40.0, 80.0, 320.0, 1008),
  "NVIDIA GeForce RTX 3090": _gpu(35.6, 71.0, 284.0, 936),
  "NVIDIA GeForce RTX 3080 Ti": _gpu(34.1, 68.2, 272.8, 912),
  "NVIDIA GeForce RTX 3080": _gpu(29.8, 59.5, 238.0, 760),
  "NVIDIA GeForce RTX 3070": _gpu(20.3, 40.6, 162.6, 448),
  "NVIDIA GeForce RTX 3060 Ti": _gpu(16.2, 32.4, 129.6, 448),
  "NVIDIA GeForce RTX 3060": _gpu(12.7, 25.5, 101.9, 360),  # 12 GB
  # NVIDIA data centre and embedded: the same die comes with different memory, hence one entry per memory variant.
  "NVIDIA A100-PCIE-40GB": _gpu(19.5, 312, 624, 1555),
  "NVIDIA A100-SXM4-40GB": _gpu(19.5, 312, 624, 1555),
  "NVIDIA A100 80GB PCIe": _gpu(19.5, 312, 624, 1935),
  "NVIDIA A100-SXM4-80GB": _gpu(19.5, 312, 624, 2039),
  "NVIDIA H100 PCIe": _gpu(51.2, 756, 1513, 2000),
  "NVIDIA H100 80GB HBM3": _gpu(66.9, 989.4, 1978.9, 3350),  # SXM5
  "NVIDIA H200": _gpu(66.9, 989.4, 1978.9, 4800),  # SXM
  "NVIDIA L40S": _gpu(91.6, 362.1, 733, 864),
  "NVIDIA A10": _gpu(31.2, 125, 250, 600),
  "NVIDIA L4": _gpu(30.3, 121, 242.5, 300),
  "Tesla T4": _gpu(8.1, 65, 130, 320),  # what nvidia-smi prints for a T4
  "NVIDIA T4": _gpu(8.1, 65, 130, 320),
  "NVIDIA Jetson AGX Orin": _gpu(5.3, 42.5, 85, 204.8),  # 64 GB module, GPU only (the DLAs add int8 TOPS)
  # AMD Radeon: fp32 counts RDNA3 dual issue, as AMD's figures do.
  "AMD Radeon RX 7900 XTX": _gpu(61.4, 122.8, 122.8, 960),
  "AMD Radeon RX 7900 XT": _gpu(51.6, 103.2, 103.2, 800),
  "AMD Radeon RX 7800 XT": _gpu(37.3, 74.6, 74.6, 624),
  "AMD Radeon RX 6900 XT": _gpu(23.04, 46.08, 92.16, 512),
  "AMD Radeon RX 6800 XT": _gpu(20.74, 41.47, 82.94, 512),
  "AMD Radeon RX 6800": _gpu(16.17, 32.33, 64.67, 512),
  # AMD Instinct: fp32 is the vector figure (the matrix cores double it).
  "AMD Instinct MI325X": _gpu(81.7, 1307.4, 2614.9, 6000),
  "AMD Instinct MI300X": _gpu(81.7, 1307.4, 2614.9, 5300),
  "AMD Instinct MI250X": _gpu(47.9, 383, 383, 3276.8),
  "AMD Instinct MI250": _gpu(45.3, 362.1, 362.1, 3276.8),
  "AMD Instinct MI210": _gpu(22.6, 181, 181, 1638.4),
}


def _normalise(chip: str) -> str:
  return " ".join(chip.split()).lower()


_BY_NORMALISED_NAME = {_normalise(name): spec for name, spec in CHIPS.items()}


def chip_spec(chip: str) -> ChipSpec | None:
  """The spec of `chip`, matched ignoring case and spacing (nvidia-smi and users spell names differently); None if unknown."""
  return _BY_NORMALISED_NAME.get(_normalise(chip))


def capabilities_for_chip(chip: str, memory_mb: float, model: str = "Unknown Model") -> DeviceCapabilities:
  """A device with `chip`'s flops and memory bandwidth, or zeros (unknown) when the chip is not in CHIPS."""
  spec = chip_spec(chip)
  if spec is None:
    return DeviceCapabilities(model=model, chip=chip, memory=memory_mb)
  return DeviceCapabilities(model=model, chip=chip, memory=memory_mb, flops=spec.flops, memory_bandwidth=spec.memory_bandwidth)
