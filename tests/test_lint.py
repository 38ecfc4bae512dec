import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command):
  result = subprocess.run([sys.executable, "-m", "ruff", *command, "exo", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def oversized(source: str, name: str) -> list[str]:
  """What in one module's source breaks the size rules: the module past MAX_MODULE_LINES lines, each function (methods and
  nested functions included) past MAX_FUNCTION_LINES."""
  found = [f"{name}: {source.count(chr(10))} lines"] if source.count("\n") > MAX_MODULE_LINES else []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
      found.append(f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
  return found


def test_no_module_over_400_lines_and_no_function_over_60():
  """The package, the tests and the benchmarks; generated gRPC code aside."""
  paths = [p for folder in ("exo", "tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py")) if "_pb2" not in p.name]
  assert [line for p in paths for line in oversized(p.read_text(), str(p.relative_to(ROOT)))] == []


def test_the_size_rules_catch_a_long_module_and_a_long_method():
  long_method = "class A:\n  def f(self):\n" + "    x = 1\n" * MAX_FUNCTION_LINES
  assert oversized(long_method, "m.py") == [f"m.py:2 f: {MAX_FUNCTION_LINES + 1} lines"]
  assert oversized("x = 1\n" * (MAX_MODULE_LINES + 1), "m.py") == [f"m.py: {MAX_MODULE_LINES + 1} lines"]
  assert oversized("def f():\n" + "  x = 1\n" * (MAX_FUNCTION_LINES - 1), "m.py") == []


def test_no_two_classes_share_a_name():
  """A class name says which class it is, across the package, the tests and the benchmarks (generated gRPC code aside)."""
  paths = [p for folder in ("exo", "tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py")) if "_pb2" not in p.name]
  where: dict[str, list[str]] = {}
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef):
        where.setdefault(node.name, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
  assert {name: places for name, places in where.items() if len(places) > 1} == {}
