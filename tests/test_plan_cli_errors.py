"""`exo plan` refuses what it cannot plan with one line on stderr and nothing on stdout: bad topology and model-spec files, bad
flags, and node command lines with the same mistakes."""

import os

import pytest

from exo.main import main
from tests.support.plan_files import HAND_MODEL, HAND_TOPOLOGY, plain_terminal, run, write  # noqa: F401 (plain_terminal: an autouse fixture)

# ---------- user mistakes: one line on stderr, nothing on stdout ----------

SMALL = {"memory": 3000, "flops": {"fp16": 10}, "memory_bandwidth": 100}  # holds 2 of HAND_MODEL's 1 GB layers
NODE = {"memory": 8192, "memory_bandwidth": 100}

BAD_INPUTS = {
  "unknown key": ({"nodes": {"a": {**NODE, "gpu": "yes"}}, "edges": []}, [], "'gpu'"),
  "NaN": ('{"nodes": {"a": {"memory": NaN}}, "edges": []}', [], "NaN"),
  "negative memory": ({"nodes": {"a": {**NODE, "memory": -1}}, "edges": []}, [], "'a'.memory must be a number from 0 to 1e+15, got -1"),
  "huge memory": ({"nodes": {"a": {**NODE, "memory": 1e308}}}, [], "'a'.memory must be a number from 0 to 1e+15, got 1e+308"),
  "400-digit integer": ('{"nodes": {"a": {"memory": ' + "9" * 400 + "}}}", [], "an integer of 400 digits"),
  "tiny TFLOPS": ({"nodes": {"a": {**NODE, "flops": {"fp16": 1e-308}}}}, [], "fp16 must be 0 (unknown) or at least 1e-09"),
  "tiny bandwidth": ({"nodes": {"a": {**NODE, "memory_bandwidth": 5e-324}}}, [], "memory_bandwidth must be 0 (unknown) or at least 1e-09"),
  "deep nesting": ("[" * 100_000 + "]" * 100_000, [], "nests arrays or objects too deeply"),
  "lone surrogate node id": ('{"nodes": {"\\ud800": {"memory": 8192}}}', [], "must be valid Unicode text"),
  "edge to unknown node": ({"nodes": {"a": NODE}, "edges": [{"from": "a", "to": "ghost"}]}, [], "unknown node 'ghost'"),
  "duplicate node id": ('{"nodes": {"a": {"memory": 8192}, "a": {"memory": 4096}}, "edges": []}', [], "duplicate key 'a'"),
  "bad JSON": ('{"nodes": {', [], "not valid JSON"),
  "unknown model id": ({"nodes": {"a": NODE}}, ["--model", "llama-9"], "unknown model 'llama-9'"),
  "missing file": (None, [], "missing.json"),
  "not UTF-8": (b"\xff\xfe{}", [], "is not UTF-8 text"),
  "model too large": ({"nodes": {"a": SMALL}}, [], "does not fit"),
  "no edges to form a ring": ({"nodes": {"a": SMALL, "b": SMALL}, "edges": []}, [], "no ring can hold model 'hand'"),
  "both --model and --model-spec": ({"nodes": {"a": NODE}}, ["--model", "llama-3.2-1b"], "not allowed with argument --model"),
  "bad --objective": ({"nodes": {"a": NODE}}, ["--objective", "fastest"], "invalid choice: 'fastest'"),
  "bad --memory-headroom": ({"nodes": {"a": NODE}}, ["--memory-headroom", "1.5"], "memory headroom must be a fraction in [0, 1), got 1.5"),
  "bad --default-rtt-ms": ({"nodes": {"a": NODE}}, ["--default-rtt-ms", "-3"], "default RTT"),
  "bad --prompt-tokens": ({"nodes": {"a": NODE}}, ["--prompt-tokens", "0"], "--prompt-tokens"),
  "unknown flag": ({"nodes": {"a": NODE}}, ["--fast"], "unrecognized arguments: --fast"),
  "unwritable plot": ({"nodes": {"a": NODE}}, ["--plot", "/nonexistent-dir/x.png"], "cannot write plot"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_on_stderr(tmp_path, capsys, case):
  topology, extra, expected = BAD_INPUTS[case]
  topology_path = str(tmp_path / "missing.json") if topology is None else write(tmp_path, "t.json", topology)
  spec = [] if "--model" in extra and case != "both --model and --model-spec" else ["--model-spec", write(tmp_path, "m.json", HAND_MODEL)]
  status, out, err = run(capsys, "--topology", topology_path, *spec, *extra)
  assert status != 0
  assert out == ""
  assert err.startswith("exo plan: error: ") and err.endswith("\n") and err.count("\n") == 1, err
  assert expected in err


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "oversized"])
@pytest.mark.parametrize("flag", ["--topology", "--model-spec"])
def test_files_that_are_not_regular_or_too_large_are_refused(tmp_path, capsys, flag, kind):
  """/dev/zero would be read until memory runs out, a FIFO would block for a writer: each is refused by its type, before any
  read; a regular file over 16 MB by its size."""
  if kind == "fifo":
    os.mkfifo(tmp_path / "pipe")
  elif kind == "oversized":
    (tmp_path / "big.json").write_bytes(b" " * (16 * 2**20 + 1))
  path = {"device": "/dev/zero", "fifo": str(tmp_path / "pipe"), "directory": str(tmp_path), "oversized": str(tmp_path / "big.json")}[kind]
  files = {"--topology": write(tmp_path, "t.json", HAND_TOPOLOGY), "--model-spec": write(tmp_path, "m.json", HAND_MODEL), flag: path}
  status, out, err = run(capsys, *(a for pair in files.items() for a in pair))
  assert status == 2 and out == "" and err.count("\n") == 1, err
  assert path in err and ("is 16.8 MB; at most 16.8 MB is read" if kind == "oversized" else "is not a regular file") in err


def test_a_model_spec_with_no_layer_bytes_is_refused(tmp_path, capsys):
  spec = write(tmp_path, "m.json", {**HAND_MODEL, "layer_bytes": 0, "kv_bytes_per_layer": 1000, "head_bytes": 4096})
  status, out, err = run(capsys, "--topology", write(tmp_path, "t.json", HAND_TOPOLOGY), "--model-spec", spec)
  assert status == 2 and out == "" and err.count("\n") == 1 and "layer_bytes must be > 0, got 0" in err, err


@pytest.mark.parametrize("target", ["directory", "no extension", "fifo"])
def test_a_plot_path_that_is_not_an_image_file_is_refused(tmp_path, capsys, target):
  """A directory would make matplotlib write DIR.png beside it, a name without extension NAME.png, a FIFO would block."""
  (tmp_path / "plots").mkdir()
  if target == "fifo":
    os.mkfifo(tmp_path / "pipe.png")
  path = {"directory": tmp_path / "plots", "no extension": tmp_path / "ring", "fifo": tmp_path / "pipe.png"}[target]
  args = ["--topology", write(tmp_path, "t.json", HAND_TOPOLOGY), "--model-spec", write(tmp_path, "m.json", HAND_MODEL)]
  status, out, err = run(capsys, *args, "--plot", str(path))
  assert status == 2 and out == "" and err.count("\n") == 1 and f"cannot write plot {str(path)!r}" in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plots", "t.json", "m.json", *(["pipe.png"] if target == "fifo" else [])])


def test_a_model_of_too_many_layers_is_refused(tmp_path, capsys):
  spec = write(tmp_path, "m.json", {**HAND_MODEL, "n_layers": 10**9})
  status, out, err = run(capsys, "--topology", write(tmp_path, "t.json", HAND_TOPOLOGY), "--model-spec", spec)
  assert status != 0 and out == "" and "n_layers must be a whole number from 1 to 10000, got 1000000000" in err


def test_bad_model_spec_key(tmp_path, capsys):
  spec = write(tmp_path, "m.json", {**HAND_MODEL, "n_heads": 8})
  status, out, err = run(capsys, "--topology", write(tmp_path, "t.json", HAND_TOPOLOGY), "--model-spec", spec)
  assert status != 0 and out == "" and err.count("\n") == 1 and "'n_heads'" in err


def test_missing_required_flags(capsys):
  status, out, err = run(capsys)
  assert status == 2 and out == "" and err == "exo plan: error: the following arguments are required: --topology\n"


# ---------- the `exo` command ----------


def test_node_command_line_mistakes_are_refused_before_anything_starts(capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["--objective", "fast"])
  assert exit_info.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err  # `exo run`'s: tests/test_cli.py


def test_plan_help(capsys):
  status, out, err = run(capsys, "--help")
  assert status == 0 and "--topology" in out and "--partitioning-strategy" in out and err == ""
