"""What a node may download (--allow-downloads) and how much (--models-max-gb, else 10% of the disk left free), against a
Hugging Face Hub on 127.0.0.1: a request naming a repository outside the allowed set asks nothing of the hub and keeps nothing;
a download beyond the budget is refused before any file is fetched; a download that fails keeps nothing."""

import json
import shutil

import huggingface_hub
import pytest

from exo.base.errors import BadInput, ModelNotFound
from exo.inference import downloads
from exo.inference.downloads import ensure_model
from exo.main import main
from exo.node_flags import build_parser
from exo.node_setup import build_node
from tests.support.chat_once import chat_replies
from tests.support.local_hub import LocalHub

MB = 1_000_000
CONFIG = json.dumps({"model_type": "llama"}).encode()
DEVICE = ["--memory-mb", "16384", "--tflops", "10", "--memory-bandwidth", "100"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
  """Three repositories fill/a1..a3 of 1 MB of weights each, the models folder tmp_path/models, the default policy."""
  import huggingface_hub.constants

  repos = {f"fill/a{i}": {"config.json": CONFIG, "model.safetensors": bytes([i]) * MB} for i in (1, 2, 3)}
  server = LocalHub(repos).start()
  monkeypatch.setenv("HF_ENDPOINT", server.url)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "models"))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("EXO_ALLOW_DOWNLOADS", raising=False)
  monkeypatch.delenv("EXO_MODELS_MAX_GB", raising=False)
  yield server
  server.stop()


def kept(tmp_path) -> list[str]:
  """Every file and folder in the models folder."""
  return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "models").rglob("*"))


def fetched(hub: LocalHub, repo: str, methods=("HEAD", "GET")) -> list[str]:
  """The requests for the files of `repo` (huggingface_hub asks for each one's metadata, HEAD, then for its content, GET)."""
  return [path for method, path, _ in hub.requests if method in methods and path.startswith(f"/{repo}/resolve/")]


def one_error_line(capsys) -> str:
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.startswith("exo: error: ")]
  assert out == "" and len(lines) == 1, err
  return lines[0]


def test_requests_through_the_api_for_repositories_outside_the_built_in_models_download_nothing(hub, tmp_path):
  """The issue's case: fill/a1..a3 named by requests were downloaded and kept. By default, nothing is asked of the hub."""
  node = build_node(build_parser().parse_args(["--inference-engine", "dummy", "--discovery-module", "none", "--node-host", "127.0.0.1", *DEVICE]))

  answers = chat_replies(node, [f"fill/a{i}" for i in (1, 2, 3)])
  for i, (status, body) in enumerate(answers, 1):
    assert status == 400, body
    assert body["error"]["message"].startswith(f"downloads of 'fill/a{i}' are not allowed: only the built-in models' are"), body
    assert "--allow-downloads any" in body["error"]["message"]
  assert hub.requests == [] and kept(tmp_path) == []


def test_builtin_allows_exactly_the_built_in_repositories(hub, tmp_path):
  """A built-in GGUF build named by its repository and file is allowed (the local hub then says it has no such repository);
  the same repository without the file, which holds other builds too, is not."""
  with pytest.raises(ModelNotFound, match="no model repository 'bartowski/Llama-3.2-1B-Instruct-GGUF'"):
    ensure_model("bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_0.gguf")
  assert len(hub.requests) == 1  # the listing, nothing fetched
  with pytest.raises(BadInput, match="downloads of 'bartowski/Llama-3.2-1B-Instruct-GGUF' are not allowed"):
    ensure_model("bartowski/Llama-3.2-1B-Instruct-GGUF")
  assert len(hub.requests) == 1 and kept(tmp_path) == []


def test_none_allows_nothing_and_any_allows_any_repository(hub, tmp_path, monkeypatch):
  monkeypatch.setenv("EXO_ALLOW_DOWNLOADS", "none")
  with pytest.raises(BadInput, match="downloads of 'llama-3.2-1b' are not allowed: downloads are turned off"):
    ensure_model("llama-3.2-1b")
  assert hub.requests == []
  monkeypatch.setenv("EXO_ALLOW_DOWNLOADS", "any")
  monkeypatch.setenv("EXO_MODELS_MAX_GB", "1")
  path = ensure_model("fill/a1")
  assert (path / "model.safetensors").read_bytes() == bytes([1]) * MB


def test_the_node_flag_sets_the_policy(hub, capsys):
  assert main(["run", "fill/a1", "--prompt", "hi", "--inference-engine", "dummy", "--allow-downloads", "none", *DEVICE]) == 2
  assert "downloads are turned off (--allow-downloads none)" in one_error_line(capsys)
  assert hub.requests == []


def test_exo_download_fetches_any_repository_within_the_budget(hub, tmp_path, capsys):
  """--models-max-gb 0.0025: the models folder may hold 2.5 MB. fill/a1 and fill/a2 (1 MB and a few bytes each) fit; fill/a3
  would take it past 3 MB, so it is refused once listed, before any of its files is fetched, and nothing of it is kept."""
  assert main(["download", "fill/a1", "--models-max-gb", "0.0025"]) == 0
  assert main(["download", "fill/a2", "--models-max-gb", "0.0025"]) == 0
  capsys.readouterr()
  assert main(["download", "fill/a3", "--models-max-gb", "0.0025"]) == 2
  line = one_error_line(capsys)
  assert "not enough room for fill/a3 within --models-max-gb 0.0025: it needs 1.0 MB and the models folder" in line and "holds 2.0 MB" in line
  assert fetched(hub, "fill/a3") == [] and not any("fill--a3" in path for path in kept(tmp_path))
  assert len(fetched(hub, "fill/a1", ["GET"])) == len(fetched(hub, "fill/a2", ["GET"])) == 2  # its config and its weights


@pytest.mark.parametrize("free_mb, fits", [(10.5, False), (11.5, True)])
def test_by_default_a_download_leaves_a_tenth_of_the_disk_free(hub, tmp_path, monkeypatch, capsys, free_mb, fits):
  """A 100 MB disk: fill/a1 (1 MB and its config) fits with 11.5 MB free (10.5 MB left, over 10 MB) and not with 10.5 MB."""
  monkeypatch.setattr(downloads, "_disk_usage", lambda path: shutil._ntuple_diskusage(100 * MB, 100 * MB - int(free_mb * MB), int(free_mb * MB)))
  assert main(["download", "fill/a1"]) == (0 if fits else 2)
  if fits:
    assert capsys.readouterr().out.strip().endswith("snapshots/c0ffee0000000000000000000000000000000001")
  else:
    line = one_error_line(capsys)
    assert "not enough disk space for fill/a1: it needs 1.0 MB" in line and "10% of the disk (10.0 MB) stays free" in line
    assert fetched(hub, "fill/a1") == [] and kept(tmp_path) == []


def test_a_download_that_fails_keeps_nothing(hub, tmp_path, monkeypatch, capsys):
  """The hub lists model.safetensors at 1 MB, then serves 2 MB of it: the download fails once the file is in, and neither it
  nor the config.json fetched before it, nor any folder, is kept."""
  listing = huggingface_hub.HfApi.model_info

  def grows_after_listing(self, repo_id, **kwargs):
    info = listing(self, repo_id, **kwargs)
    hub.repos[repo_id]["model.safetensors"] = bytes(2 * MB)
    return info

  monkeypatch.setattr(huggingface_hub.HfApi, "model_info", grows_after_listing)
  assert main(["download", "fill/a1", "--models-max-gb", "1"]) == 1
  assert "model.safetensors of fill/a1 came as 2000000 bytes where" in one_error_line(capsys)
  assert len(fetched(hub, "fill/a1", ["GET"])) == 2  # config.json and the weights were fetched, then removed
  assert kept(tmp_path) == [] and not (tmp_path / "models").exists()
