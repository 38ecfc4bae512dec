"""Value types of the exo commands' flags: argparse reports a bad value as one usage error naming the flag."""

import argparse
import math

from exo.base.model_spec import MAX_CONTEXT
from exo.inference.sampling import MAX_SEED, MAX_TOP_K
from exo.topology.cost_model import OBJECTIVES, PlannerParams
from exo.topology.plan_request import STRATEGIES, PlanRequest


def positive_int(text: str) -> int:
  """A whole number >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
  return value


def slowdown_factor(text: str) -> float:
  """A factor >= 1."""
  try:
    factor = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a factor >= 1, got {text!r}") from None
  if not factor >= 1:
    raise argparse.ArgumentTypeError(f"expected a factor >= 1, got {text!r}")
  return factor


def _number(text: str, expected: str, valid) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
  if not valid(value):  # NaN fails every comparison, so it is refused too
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
  return value


def _whole(text: str, low: int, high: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}") from None
  if not low <= value <= high:
    raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
  return value


def gigabytes(text: str) -> float:
  """A finite number of gigabytes above 0."""
  return _number(text, "a number of gigabytes above 0", lambda v: 0 < v < math.inf)


def temperature(text: str) -> float:
  """A finite number >= 0; 0 is greedy."""
  return _number(text, "a number >= 0 (0: greedy)", lambda v: 0 <= v < math.inf)


def top_p(text: str) -> float:
  """A probability mass above 0 and at most 1."""
  return _number(text, "a number above 0 and at most 1", lambda v: 0 < v <= 1)


def top_k(text: str) -> int:
  """A whole number >= 0; 0 keeps every token."""
  return _whole(text, 0, MAX_TOP_K)


def seed(text: str) -> int:
  """A whole number from 0 to 2**63 - 1."""
  return _whole(text, 0, MAX_SEED)


def add_planner_flags(group) -> None:
  """The planning flags `exo` and `exo plan` share: strategy, objective and the cost model's parameters."""
  group.add_argument(
    "--partitioning-strategy", choices=STRATEGIES, default=STRATEGIES[0], help=f"how layers are split among nodes (default: {STRATEGIES[0]})"
  )
  group.add_argument("--objective", choices=OBJECTIVES, default=OBJECTIVES[0], help="minimise time per token or maximise pipelined tokens/s")
  group.add_argument(
    "--memory-headroom",
    type=float,
    default=PlannerParams.memory_headroom,
    metavar="FRACTION",
    help=f"memory kept free on each node (default: {PlannerParams.memory_headroom})",
  )
  group.add_argument(
    "--default-rtt-ms",
    type=float,
    default=PlannerParams.default_rtt_ms,
    metavar="MS",
    help=f"RTT assumed for unmeasured edges (default: {PlannerParams.default_rtt_ms})",
  )
  group.add_argument(
    "--max-batch",
    "--batch",
    dest="max_batch",
    type=positive_int,
    default=None,
    metavar="B",
    help="the most requests a stage runs in one engine call, and the throughput objective's batch (--batch is its old name). A "
    "node's default: its engine's (ggml 16, tinygrad 8 where batching is exact, MLX 1), lowered to the requests whose KV cache "
    "fits in its memory beside its layers; exo plan's: 1",
  )
  group.add_argument(
    "--max-context",
    type=positive_int,
    default=None,
    metavar="TOKENS",
    help=f"cap the context (prompt and answer) whose KV cache each request reserves on every node (default: the model's, at most "
    f"{MAX_CONTEXT}); a cluster that cannot hold it is planned at the largest multiple of 256 tokens it holds",
  )


def plan_request(args: argparse.Namespace, engine_batch: int = 1) -> PlanRequest:
  """The PlanRequest the flags of add_planner_flags ask for, at --max-batch or else `engine_batch` (a node's engine's own); BadInput
  naming a value the planner cannot take."""
  params = PlannerParams(args.memory_headroom, args.default_rtt_ms, args.max_batch or engine_batch)
  return PlanRequest(args.partitioning_strategy, args.objective, params, args.max_context)
