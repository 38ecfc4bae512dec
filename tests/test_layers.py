"""The layers import downward only: base <- topology <- inference <- networking <- orchestration <- api (and the terminal view)
<- main. `exo/base` (shared types and errors) imports nothing of exo outside itself, and the engines do not import the planner.

Every `import` and `from ... import` in the package (at any depth, also inside functions) is read with `ast`; a module may
import from its own layer and the layers below it. The benchmarks may use the package, never the tests.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["base", "topology", "inference", "networking", "orchestration", "api", "main"]
LAYER_OF = {
  **{name: i for i, name in enumerate(LAYERS)},
  "viz": LAYERS.index("api"),
  "plan_cli": LAYERS.index("main"),
  "cli_args": LAYERS.index("main"),
  "node_flags": LAYERS.index("main"),
  "node_setup": LAYERS.index("main"),
  "tools": LAYERS.index("main"),
}
SHARED = {"exo.base.errors", "exo.base.files", "exo"}


def layer_of(module: str) -> int | None:
  """The layer index of an `exo` module name; None for `exo.base.errors`, `exo.base.files`, the package itself and modules outside it."""
  parts = module.split(".")
  if parts[0] != "exo" or module in SHARED or parts[1] == "__init__":
    return None
  return LAYER_OF[parts[1]]


def imports(path: Path) -> list[tuple[int, str]]:
  """(line, module) of every absolute import in a file."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.append((node.lineno, node.module))
  return found


def module_name(path: Path) -> str:
  return ".".join(path.relative_to(ROOT).with_suffix("").parts)


PACKAGE = sorted((ROOT / "exo").rglob("*.py"))


@pytest.mark.parametrize("path", PACKAGE, ids=[str(p.relative_to(ROOT)) for p in PACKAGE])
def test_package_modules_import_downward_only(path):
  own = layer_of(module_name(path))
  upward = [f"line {line}: {module}" for line, module in imports(path) if own is not None and (layer_of(module) or -1) > own]
  assert upward == [], f"{path.relative_to(ROOT)} (layer {LAYERS[own]}) imports a higher layer: {upward}"


def exo_imports(package: str) -> dict[str, list[str]]:
  """The `exo` modules each module of `exo/<package>` imports."""
  return {str(p.relative_to(ROOT)): [m for _, m in imports(p) if m.startswith("exo.")] for p in sorted((ROOT / "exo" / package).rglob("*.py"))}


def test_base_imports_nothing_of_exo_but_itself():
  outside = {path: [m for m in found if not m.startswith("exo.base")] for path, found in exo_imports("base").items()}
  assert {path: found for path, found in outside.items() if found} == {}


def test_topology_imports_nothing_of_exo_but_itself_and_base():
  outside = {path: [m for m in found if m.split(".")[1] not in ("base", "topology")] for path, found in exo_imports("topology").items()}
  assert {path: found for path, found in outside.items() if found} == {}


def test_engines_do_not_import_the_planner():
  planner = {path: [m for m in found if m.startswith("exo.topology")] for path, found in exo_imports("inference").items()}
  assert {path: found for path, found in planner.items() if found} == {}


def test_benchmarks_do_not_import_the_tests():
  for path in sorted((ROOT / "benchmarks").glob("*.py")):
    assert not [m for _, m in imports(path) if m.split(".")[0] == "tests"], f"{path.relative_to(ROOT)} imports the tests"


def test_the_rule_catches_the_imports_it_forbids(tmp_path):
  """The checks above would fail on each kind of upward import the package once had."""
  cases = {
    "exo.networking.peer_handle": "from exo.orchestration.request_context import RequestContext",
    "exo.topology.plan": "from exo.inference.shard import Shard",
    "exo.base.shard": "from exo.topology.plan import Plan",
    "exo.inference.engine": "import exo.networking.server",
  }
  for module, line in cases.items():
    path = tmp_path / "m.py"
    path.write_text(line + "\n")
    ((_, imported),) = imports(path)
    assert layer_of(imported) > layer_of(module)


def test_topology_modules_import_their_own_tier_or_lower():
  """Inside the planner the tiers, lowest first, are: the cost model, what nodes hold, layer splits and upstream's strategy seam; the search
  problem and the plan; ring orders and bounds; the searches (exact latency, exact throughput, the heuristic, feasibility);
  the one dispatcher that picks a search; the strategies; the planner. A module of exo/topology imports modules of its own
  tier or lower only, and every module has a tier."""
  tiers = [
    ["cost_model", "holdings", "plan_request", "layer_split", "partitioning_strategy"],
    ["search_problem", "plan"],
    ["rings", "cycles", "path_tables", "bounds"],
    ["exact_latency", "exact_throughput", "heuristic", "feasibility", "cannot_serve"],
    ["search"],
    ["flops_latency_partitioning_strategy", "ring_memory_weighted_partitioning_strategy"],
    ["planner"],
  ]
  tier_of = {f"exo.topology.{name}": tier for tier, names in enumerate(tiers) for name in names}
  found = {module_name(ROOT / path): imported for path, imported in exo_imports("topology").items() if not path.endswith("__init__.py")}
  assert sorted(found) == sorted(tier_of), "every module of exo/topology has exactly one tier"
  upward = {module: [m for m in imported if tier_of.get(m, -1) > tier_of[module]] for module, imported in found.items()}
  assert {module: above for module, above in upward.items() if above} == {}
