from setuptools import find_packages, setup

setup(
  name="exo",
  version="0.1.0",
  description="Run one LLM across your home devices, split by a flops- and latency-aware planner",
  license="GPL-3.0",
  python_requires=">=3.11",
  packages=find_packages(include=["exo", "exo.*"]),
  package_data={"exo": ["**/*.json", "api/static/*"]},
  install_requires=[
    "numpy>=1.26",
    "rich>=13",
    "matplotlib>=3.8",
    "grpcio>=1.85.1",  # the generated stubs require at least the version that generated them (grpcio-tools, pinned below)
    "protobuf>=7.35.1,<8",
    "psutil>=5.9",
    "gguf>=0.10",
    "tokenizers>=0.20",
    "jinja2>=3.1",
    "ggml-python==0.0.45",  # setup.sh builds it first, for the CPU features in its CMAKE_ARGS
    "tinygrad>=0.10",
    "mlx[cpu]>=0.25; platform_system == 'Linux'",
    "mlx>=0.25; platform_system == 'Darwin'",
    "mlx-lm>=0.32",
    "aiohttp>=3.9",
    "huggingface_hub>=2.4",  # downloads (exo/inference/downloads.py); its errors come from httpx2, which it brings
  ],
  extras_require={
    "test": [
      "pytest>=8",
      "hypothesis==6.170.27",
      "ruff==0.17.6",
      "grpcio-tools==1.85.1",  # the version that generated the committed stubs
      "pytest-xdist>=3.6",  # two test processes (pytest.ini)
      "pytest-timeout>=2.3",  # a hung test fails after 15 minutes (pytest.ini)
      "openai>=1.0",  # the official clients the API tests drive
      "anthropic>=0.40",
      "ollama>=0.4",
      "safetensors>=0.4",
      "playwright>=1.49",
    ],
  },
  entry_points={"console_scripts": ["exo = exo.main:main"]},
)
