"""Whether this host has a GPU, from its device nodes alone (importing a GPU library to ask would cost tens of MB)."""

import os

GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dri")  # NVIDIA, AMD (ROCm), any DRM GPU


def has_gpu() -> bool:
  return any(os.path.exists(p) for p in GPU_DEVICE_NODES)
