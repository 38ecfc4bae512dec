"""The lean GGUF header reader agrees with gguf-py's GGUFReader on every field and tensor, and names bad files clearly."""

import gguf
import numpy as np
import pytest

from exo.base.errors import ExoError
from exo.inference.gguf_header import read_header
from exo.inference.model_files import locate_model
from tests.inference.tiny_models import TINY, TINY_QWEN2, tiny_weights, write_gguf

Q = gguf.GGMLQuantizationType


def assert_same_as_gguf_py(path):
  header, reader = read_header(str(path)), gguf.GGUFReader(path)
  assert header.fields == {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}  # not file keys
  assert list(header.tensors) == [t.name for t in reader.tensors]
  for t in reader.tensors:
    mine = header.tensors[t.name]
    assert (mine.tensor_type, mine.shape, mine.n_elements, mine.n_bytes, mine.offset) == (
      t.tensor_type,
      tuple(int(d) for d in t.shape),
      t.n_elements,
      t.n_bytes,
      t.data_offset,
    ), t.name
    assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape and np.array_equal(mine.data, t.data), t.name


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("config", [TINY, TINY_QWEN2], ids=["llama", "qwen2"])
def test_tiny_files(tmp_path, qtype, config):
  write_gguf(tmp_path / "m.gguf", tiny_weights(config), config, qtype=qtype, rope_factors=np.linspace(1, 8, config.head_dim // 2))
  assert_same_as_gguf_py(tmp_path / "m.gguf")


def test_smollm2_file_with_its_vocabulary_and_template():
  assert_same_as_gguf_py(locate_model("smollm2-135m"))


@pytest.mark.parametrize(
  "content, problem",
  [
    (b"", "empty"),
    (b"GGML" + bytes(20), "GGUF magic"),
    (b"GGUF\x09\x00\x00\x00" + bytes(16), "version 9"),
    (b"GGUF\x03\x00\x00\x00", "runs past the end"),
  ],
)
def test_bad_files_are_one_clear_error(tmp_path, content, problem):
  (tmp_path / "bad.gguf").write_bytes(content)
  with pytest.raises(ExoError, match=f"bad.gguf is not a readable GGUF file: .*{problem}"):
    read_header(str(tmp_path / "bad.gguf"))


def test_a_truncated_download_is_named(tmp_path):
  write_gguf(tmp_path / "m.gguf", tiny_weights(TINY), TINY)
  (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:-100])
  with pytest.raises(ExoError, match="truncated"):
    read_header(str(tmp_path / "cut.gguf"))
