"""Model files whose counts and sizes are out of bounds: each is one BadInput naming the field (a 400 through the API), found
before anything is allocated for it, so the process's memory grows by less than 50 MB however large the value."""

import dataclasses
import json
import struct

import psutil
import pytest

from exo.base.errors import BadInput
from exo.inference.gguf_header import read_header
from exo.inference.llama_layout import EMBED
from exo.inference.llama_weights import load_config
from exo.inference.model_figures import model_spec_from_file
from exo.inference.safetensors_model import safetensors_index
from exo.node_flags import build_parser
from exo.node_setup import build_node
from tests.inference.tiny_models import TINY, tiny_weights, write_gguf, write_hf_dir
from tests.support.chat_once import chat_replies

DEVICE = ["--memory-mb", "16384", "--tflops", "10", "--memory-bandwidth", "100"]


def refused(call, match: str) -> BadInput:
  """`call` raises a BadInput matching `match`, and the process's resident memory grew by less than 50 MB meanwhile."""
  process = psutil.Process()
  before = process.memory_info().rss
  with pytest.raises(BadInput, match=match) as error:
    call()
  assert process.memory_info().rss - before < 50e6
  assert "\n" not in str(error.value)
  return error.value


@pytest.fixture
def hf_dir(tmp_path):
  """A tiny Hugging Face checkpoint; edit(**fields) rewrites config.json's fields (None: removes one)."""
  directory = tmp_path / "model"
  write_hf_dir(directory, tiny_weights(TINY), TINY)

  def edit(**fields):
    config = json.loads((directory / "config.json").read_text())
    for key, value in fields.items():
      config.pop(key) if value is None else config.__setitem__(key, value)
    (directory / "config.json").write_text(json.dumps(config))
    return directory

  return edit


@pytest.mark.parametrize("layers", [1e9, 10**6, 10**9])
def test_a_huge_layer_count_is_refused_before_any_name_is_listed(hf_dir, layers):
  directory = hf_dir(num_hidden_layers=layers)
  refused(lambda: load_config(directory), r"num_hidden_layers must be a whole number from 1 to 10000, got 1000000")
  refused(lambda: model_spec_from_file(directory), "num_hidden_layers")


def test_more_layers_than_the_file_holds_is_refused(hf_dir):
  refused(lambda: load_config(hf_dir(num_hidden_layers=4)), r"lacks tensor model\.layers\.3\.")


@pytest.mark.parametrize(
  "fields, match",
  [
    ({"hidden_size": 0}, "hidden_size must be a whole number from 1"),
    ({"hidden_size": -64}, "hidden_size must be a whole number from 1"),
    ({"vocab_size": None}, "lacks vocab_size"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be a whole number from 1 to .*, got '4'"),
    ({"num_attention_heads": 3}, "hidden_size 64 is not a multiple of num_attention_heads 3"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"intermediate_size": 1.5}, "intermediate_size must be a whole number"),
    ({"intermediate_size": 64}, r"has shape \[128, 64\], but its config implies \[64, 64\]"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a number above 0 and below 1"),
    ({"rope_theta": "x"}, "rope_theta must be a number above 0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a whole number from 1"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"model_type": ["llama"]}, "model_type is not supported"),
  ],
)
def test_config_fields_out_of_range_are_named(hf_dir, fields, match):
  refused(lambda: load_config(hf_dir(**fields)), match)


@pytest.mark.parametrize(
  "scaling, match",
  [
    ("llama3", "rope_scaling must be an object or null"),
    ({"rope_type": "yarn", "factor": 4}, "rope_scaling type 'yarn' is not supported"),
    ({"rope_type": "linear"}, "rope_scaling.factor must be a number above 0, got None"),
    ({"rope_type": "llama3", "factor": 0}, "rope_scaling.factor must be a number above 0"),
    ({"rope_type": "llama3", "low_freq_factor": 4, "high_freq_factor": 4}, "high_freq_factor .4. must be above rope_scaling.low_freq_factor"),
    ({"rope_type": "llama3", "original_max_position_embeddings": -1}, "original_max_position_embeddings must be a whole number from 1"),
  ],
)
def test_bad_rope_scaling_is_named(hf_dir, scaling, match):
  refused(lambda: load_config(hf_dir(rope_scaling=scaling)), match)


def test_deeply_nested_and_oversized_config_files_are_refused(hf_dir):
  directory = hf_dir()
  (directory / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
  refused(lambda: load_config(directory), "nests arrays or objects too deeply")
  (directory / "config.json").write_bytes(b" " * (17 << 20))
  refused(lambda: load_config(directory), r"config.json .* is 17\.8 MB; at most 16\.8 MB is read")


def test_a_safetensors_header_length_past_the_file_is_refused(hf_dir):
  directory = hf_dir()
  file = sorted(directory.glob("*.safetensors"))[0]
  data = file.read_bytes()
  file.write_bytes(struct.pack("<Q", 2**40) + data[8:])
  safetensors_index.cache_clear()
  refused(lambda: load_config(directory), f"its header length {2**40} runs past the end of the file")


def test_a_safetensors_tensor_outside_its_data_is_refused(tmp_path):
  header = json.dumps({EMBED: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 2**40]}}).encode()
  (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
  refused(lambda: safetensors_index(str(tmp_path)), r"has data_offsets \[0, 1099511627776\]; expected \[start, end\] within its 64 bytes")
  header = json.dumps({EMBED: {"dtype": "F32", "shape": [2**30, 2**30], "data_offsets": [0, 64]}}).encode()
  (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
  safetensors_index.cache_clear()
  refused(lambda: safetensors_index(str(tmp_path)), r"has 64 bytes of data, not the \[1073741824, 1073741824\] F32")


def gguf_file(tmp_path, weights=None, **fields):
  path = tmp_path / "m.gguf"
  write_gguf(path, tiny_weights(TINY) if weights is None else weights, TINY, fields=fields)
  return path


@pytest.mark.parametrize(
  "fields, match",
  [
    ({"general.alignment": 0}, "general.alignment must be a power of two, got 0"),
    ({"general.alignment": 24}, "general.alignment must be a power of two, got 24"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count must be a whole number from 1 to .*, got 0"),
    ({"llama.block_count": 2**31}, "llama.block_count must be a whole number from 1 to 10000"),
    ({"llama.block_count": 4}, "lacks tensor blk.3.attn_norm.weight"),
    ({"llama.embedding_length": 0}, "llama.embedding_length must be a whole number from 1"),
  ],
)
def test_gguf_fields_out_of_range_are_named(tmp_path, fields, match):
  path = gguf_file(tmp_path, **fields)
  refused(lambda: model_spec_from_file(path), match)


def test_a_gguf_without_its_embedding_is_refused(tmp_path):
  weights = {name: w for name, w in tiny_weights(TINY).items() if name != EMBED}
  path = gguf_file(tmp_path, weights)
  refused(lambda: load_config(path), "lacks tensor token_embd.weight")


@pytest.mark.parametrize(
  "header, match",
  [
    (struct.pack("<IQQ", 3, 2**60, 0), "a header of 0 fields and 1152921504606846976 tensors"),
    (struct.pack("<IQQ", 3, 0, 2**60), "a header of 1152921504606846976 fields and 0 tensors"),
    (struct.pack("<IQQQ", 3, 0, 1, 2**60), "a string .1152921504606846976 bytes"),
    (struct.pack("<IQQQ1sIIQ", 3, 0, 1, 1, b"k", 9, 4, 2**60), "an array of 1152921504606846976 values"),
    (struct.pack("<IQQQ1sI", 3, 0, 1, 1, b"k", 99), "a value of unknown type 99"),
  ],
)
def test_gguf_counts_past_the_file_are_refused(tmp_path, header, match):
  (tmp_path / "bad.gguf").write_bytes(b"GGUF" + header + bytes(64))
  refused(lambda: read_header(str(tmp_path / "bad.gguf")), match)


def test_a_tensor_with_a_huge_shape_is_refused(tmp_path):
  # one tensor "t": 2 dimensions of 2**40 float32 values each, at offset 0: far more than the file holds
  entry = struct.pack("<Q1sIQQIQ", 1, b"t", 2, 2**40, 2**40, 0, 0)
  (tmp_path / "big.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + entry + bytes(64))
  refused(lambda: read_header(str(tmp_path / "big.gguf")), "tensor 't' .* runs past the end of the file")


def test_the_api_answers_400_for_a_malformed_model(hf_dir):
  """A request naming a model directory whose config is out of range gets a 400, not a 500 (the API tells the client nothing of
  the directory's content; the node's log names the field)."""
  directory = hf_dir(num_hidden_layers=10**9)
  node = build_node(build_parser().parse_args(["--inference-engine", "dummy", "--discovery-module", "none", "--node-host", "127.0.0.1", *DEVICE]))

  [(status, body)] = chat_replies(node, [str(directory)])
  assert status == 400 and body["error"]["type"] == "invalid_request_error", body


def test_a_well_formed_model_still_loads(hf_dir, tmp_path):
  """The checks refuse only what is wrong: the tiny models of both formats load with the config they were written with."""
  assert load_config(hf_dir()) == TINY
  assert load_config(gguf_file(tmp_path)) == dataclasses.replace(TINY)
