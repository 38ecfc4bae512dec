"""`exo plan`: show (or print as JSON, or draw) the ring a partitioning strategy would build for a model on a topology file.

User mistakes (bad files, impossible requests, bad flags) end with one line `exo plan: error: <message>` on stderr and nothing
on stdout; anything else that goes wrong is a bug and keeps its traceback.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from exo.base.errors import BadInput, ExoError
from exo.base.model_spec import ModelSpec
from exo.base.models import MODELS, model_spec
from exo.base.topology import Topology
from exo.base.wording import count
from exo.cli_args import add_planner_flags, plan_request, positive_int
from exo.topology.cost_model import CostModel, head_layers
from exo.topology.holdings import downloads
from exo.topology.plan import Plan
from exo.topology.planner import STRATEGIES, plan_for

PROG = "exo plan"
BASELINE = "ring-memory-weighted"
MIN_PIPE_WIDTH = 120  # rich wraps to 80 columns when stdout is not a terminal, which folds the plan table


class UsageError(Exception):
  """A bad command line, raised instead of argparse's usage-and-exit so the error stays one line."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog=PROG,
    description="Plan which nodes hold which layers of a model, in what ring order, and predict its speed (docs/DESIGN.md sections 2-3).",
  )
  parser.add_argument("--topology", required=True, metavar="FILE", help="topology JSON: nodes with device capabilities, edges with RTT")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--model", metavar="ID", help=f"a built-in model: {', '.join(sorted(MODELS))}")
  which.add_argument("--model-spec", metavar="FILE", help="model spec JSON (n_layers, layer_bytes, layer_flops, ...)")
  add_planner_flags(parser)
  parser.add_argument(
    "--prompt-tokens", type=positive_int, default=128, metavar="N", help="prompt length behind the reported TTFT (default: %(default)s)"
  )
  parser.add_argument("--json", action="store_true", help="print the plan as one JSON object and nothing else")
  parser.add_argument("--compare", action="store_true", help=f"plan with both strategies and show the speed-up over {BASELINE}")
  parser.add_argument("--plot", metavar="FILE.png", help="draw the ring (both rings with --compare) to an image file")
  return parser


def main(argv: list[str] | None = None) -> int:
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:  # --help
    return e.code
  except UsageError as e:
    return _fail(e, 2)
  try:
    topology = Topology.load(args.topology)
    model = ModelSpec.load(args.model_spec) if args.model_spec else model_spec(args.model)
    strategies = STRATEGIES if args.compare else (args.partitioning_strategy,)
    request = plan_request(args)
    plans = {s: plan_for(topology, model, replace(request, strategy=s), args.prompt_tokens) for s in strategies}
    costs = next(iter(plans.values())).costs
    if args.plot:  # before printing anything, so a plot that cannot be written leaves stdout empty
      write_plot(args.plot, list(plans.values()), costs)
      print(f"plot written to {args.plot}", file=sys.stderr)  # stderr: stdout may be the JSON
  except ExoError as e:
    return _fail(e, e.exit_status)
  try:
    show(args, plans, topology, costs)
  except BrokenPipeError:  # `exo plan ... | head` closed stdout early: nothing to report, and no traceback at exit either
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  return 0


def show(args: argparse.Namespace, plans: dict[str, Plan], topology: Topology, costs: CostModel) -> None:
  if args.json:
    one = len(plans) == 1
    data = next(iter(plans.values())).to_dict() if one else {**{s: p.to_dict() for s, p in plans.items()}, "speedup": speedup(plans)}
    print(json.dumps(data, indent=2))
    return
  console = Console(file=sys.stdout, highlight=False)
  if not console.is_terminal:
    console.width = max(console.width, MIN_PIPE_WIDTH)
  for plan in plans.values():
    show_plan(console, plan, topology, costs, args.prompt_tokens)
  if args.compare:
    show_comparison(console, plans, args.objective)


def _fail(error: Exception, status: int) -> int:
  print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
  return status


# ---------- numbers ----------


def fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
  return "unknown" if value is None else f"{value:.{digits}f}{unit}"


def stage_s(costs: CostModel, node_id: str, layers: int, last: bool) -> float | None:
  """Compute time of one stage per decoded token: layers (and the head on the last stage) x per-layer time."""
  if not costs.speed_known():
    return None
  return (layers + head_layers(costs.model) * last) * costs.times(1)[costs.index(node_id)]


def layer_ms(costs: CostModel, node_id: str, topology: Topology) -> str:
  """One layer's time for one token, and where it comes from: the node's own engine (measured) or the roofline."""
  if not costs.speed_known():
    return "unknown"
  measured = costs.model.id in topology.nodes[node_id].layer_times
  return f"{costs.times(1)[costs.index(node_id)] * 1000:.3f}" + (" (measured)" if measured else "")


def hop_s(costs: CostModel, from_id: str, to_id: str) -> tuple[float, bool]:
  """(seconds, whether an edge joins the pair); a pair with no edge is charged the default RTT, as the cost model does."""
  i, j = costs.index(from_id), costs.index(to_id)
  return costs.hop_s(i, j), math.isfinite(costs.hop[i, j])


def ring_capacities(plan: Plan, costs: CostModel) -> dict[str, int]:
  """Each ring node's capacity in its role (embedding on the first, head on the last)."""
  ids = [node_id for node_id, _ in plan.ring()]
  return dict(zip(ids, costs.ring_capacities([costs.index(n) for n in ids])))


def ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or b == 0 or math.isinf(b):
    return None
  return a / b


def speedup(plans: dict[str, Plan]) -> dict:
  """flops-latency's predicted speeds divided by ring-memory-weighted's; None where a speed is unknown."""
  new, old = (plans[s].prediction.to_dict() for s in STRATEGIES)
  return {key: ratio(new[key], old[key]) for key in ("tokens_per_second", "throughput_tps")}


def left_out(plan: Plan, costs: CostModel) -> list[str]:
  in_ring = {node_id for node_id, _ in plan.ring()}
  return [node_id for node_id in costs.node_ids if node_id not in in_ring]


def speeds(predicted: dict, digits: int = 2) -> str:
  if predicted["tokens_per_second"] is None:
    return "speed unknown: no node's TFLOPS or memory bandwidth is known"
  return f"{predicted['tokens_per_second']:.{digits}f} tokens/s single stream, throughput {predicted['throughput_tps']:.{digits}f} tokens/s"


def mb(n_bytes: float) -> str:
  """Bytes in MB of 2**20 bytes, the unit of the topology's memory figures."""
  return f"{n_bytes / 2**20:.1f} MB"


def model_line(plan: Plan) -> str:
  model = plan.model
  tied = "tied" if model.tied_embeddings else "untied"
  return (
    f"Model: embedding {mb(model.embed_bytes)} on the first stage, head {mb(model.head_bytes)} on the last, {tied} embeddings; "
    f"context {plan.context_tokens} tokens per request (of the model's {model.context_tokens})"
  )


def ms(seconds: float | None) -> float | None:
  return None if seconds is None else seconds * 1000


def layer_range(shard) -> str:
  return str(shard.start_layer) if shard.start_layer == shard.end_layer else f"{shard.start_layer}-{shard.end_layer}"


def ring_size(ring: int, nodes: int) -> str:
  """How many of the topology's nodes the ring uses: 'ring of 4 of the 6 nodes'."""
  return f"on {count(nodes, 'node')}" if nodes == 1 else f"ring of all {nodes} nodes" if ring == nodes else f"ring of {ring} of the {nodes} nodes"


def ring_text(plan: Plan) -> str:
  """One ring node a line, in execution order: `node layers (count)`."""
  return "\n".join(f"{escape(node_id)} {layer_range(s)} ({s.get_layer_count()})" for node_id, s in plan.node_shards())


# ---------- text ----------


def fetch_line(plan: Plan, topology: Topology) -> str:
  """What each ring node still fetches for its stage, given the layers the topology says it holds (exo.topology.holdings)."""

  def one(d) -> str:
    if not d.bytes:
      return f"{escape(d.node_id)} nothing"
    when = "" if d.seconds is None else f", {d.seconds:.3g} s at the measured link"
    return f"{escape(d.node_id)} {d.bytes / 1e6:.1f} MB{when}"

  return "To fetch: " + "; ".join(one(d) for d in downloads(topology, plan.model, plan.stages))


def show_plan(console: Console, plan: Plan, topology: Topology, costs: CostModel, prompt_tokens: int) -> None:
  ring = ring_size(len(plan.node_shards()), len(costs.node_ids))
  title = f"{plan.strategy} plan: {escape(plan.model.id)} ({plan.model.n_layers} layers), {ring}, {plan.objective} objective"
  table = Table(title=title, title_justify="left")
  for name, justify in [
    ("#", "right"),
    ("node", "left"),
    ("device", "left"),
    ("layers", "right"),
    ("count", "right"),
    ("capacity", "right"),
    ("ms/layer", "right"),
    ("stage ms", "right"),
    ("hop to next ms", "left"),
  ]:
    table.add_column(name, justify=justify)
  shards, capacities = plan.node_shards(), ring_capacities(plan, costs)
  for k, (node_id, shard) in enumerate(shards):
    device, count, capacity = topology.nodes[node_id], shard.get_layer_count(), capacities[node_id]
    hop = "-"
    if len(shards) > 1:
      next_id = shards[(k + 1) % len(shards)][0]
      seconds, joined = hop_s(costs, node_id, next_id)
      hop = f"{seconds * 1000:.2f} → {escape(next_id)}" + ("" if joined else " [red](no edge)[/red]")
    fits = f"{capacity}" if count <= capacity else f"[red]{capacity} (over)[/red]"
    stage = stage_s(costs, node_id, count, k == len(shards) - 1)
    row = [str(k + 1), escape(node_id), escape(f"{device.model} ({device.chip})"), layer_range(shard), str(count), fits]
    table.add_row(*row, layer_ms(costs, node_id, topology), fmt(ms(stage)), hop)
  console.print(table)
  p = plan.prediction.to_dict()
  feasible = "yes" if p["feasible"] else "[red]no[/red]"
  if p["tpot_ms"] is None:
    predicted = [f"Predicted: {speeds(p)}; feasible: {feasible}"]
  else:
    predicted = [
      f"Predicted: TPOT {fmt(p['tpot_ms'])} ms ({speeds(p)} at batch {plan.params.batch})",
      f"           TTFT {fmt(p['ttft_ms'])} ms for a {prompt_tokens}-token prompt, feasible: {feasible}",
    ]
  lines = [
    *predicted,
    model_line(plan),
    f"Left out of the ring: {escape(', '.join(left_out(plan, costs))) or 'none'}",
    *([fetch_line(plan, topology)] if any(caps.holdings for caps in topology.nodes.values()) else []),
    *(f"[yellow]Warning:[/yellow] {escape(warning)}" for warning in plan.warnings),
  ]
  for line in lines:
    console.print(line, soft_wrap=True)
  console.print()


def show_comparison(console: Console, plans: dict[str, Plan], objective: str) -> None:
  table = Table(title=f"Strategies compared ({objective} objective)", title_justify="left")
  for name in ["strategy", "ring (layers)", "TPOT ms", "tokens/s", "throughput tokens/s", "TTFT ms", "feasible"]:
    table.add_column(name, justify="left" if name in ("strategy", "ring (layers)") else "right")
  for strategy, plan in plans.items():
    p = plan.prediction.to_dict()
    feasible = "yes" if p["feasible"] else "[red]no[/red]"
    table.add_row(strategy, ring_text(plan), fmt(p["tpot_ms"]), fmt(p["tokens_per_second"]), fmt(p["throughput_tps"]), fmt(p["ttft_ms"]), feasible)
  console.print(table)
  console.print(speedup_line(plans, objective), soft_wrap=True)


def speedup_line(plans: dict[str, Plan], objective: str) -> str:
  gain = speedup(plans)

  def x(value):
    return "unknown" if value is None else f"{value:.2f}x"

  tps, thr = f"{x(gain['tokens_per_second'])} tokens/s", f"{x(gain['throughput_tps'])} throughput"
  parts = [f"{tps} (latency objective)", thr] if objective == "latency" else [f"{thr} (throughput objective)", tps]
  note = "" if plans[BASELINE].prediction.feasible else f" ({BASELINE} plan is infeasible)"
  return f"{STRATEGIES[0]} vs {BASELINE}: {', '.join(parts)}{note}"


# ---------- picture ----------

# Drawn at a fixed scale, so boxes (sized in points) keep their size in data units and a bigger ring just makes a bigger picture.
INCH_PER_UNIT = 2.0
MIN_CHORD = 1.2  # data units between neighbouring ring nodes' centres: a box is about 0.65 wide and 0.35 high
ARC = -0.25  # arc3 curvature of the hop arrows; negative bends a clockwise ring's arrows outwards, away from the centre
OUT_STEP = 0.8  # spacing of the greyed boxes of nodes left out of the ring
INK, BAD, RING_FILL, OUT_FILL, OUT_INK = "#2c3e50", "#c0392b", "#dbe9f6", "#f2f2f2", "#999999"


def write_plot(path: str, plans: list[Plan], costs: CostModel) -> None:
  """Draw each plan's ring side by side and save it; raises BadInput if the file cannot be written."""
  from matplotlib.figure import Figure  # imported here: matplotlib is slow to load and only --plot needs it

  if Path(path).is_dir() or not Path(path).suffix:  # matplotlib would write DIR.png beside a directory, FILE.png for FILE
    raise BadInput(f"cannot write plot {path!r}: expected an image file name such as ring.png, not a directory or a name without extension")
  if Path(path).exists() and not Path(path).is_file():  # a FIFO would block until read, a device would take the image
    raise BadInput(f"cannot write plot {path!r}: it is not a regular file")
  fig = Figure(dpi=120, layout="constrained")
  axes = fig.subplots(1, len(plans), squeeze=False)[0]
  extents = [draw_ring(ax, plan, costs, with_model=len(plans) == 1) for ax, plan in zip(axes, plans)]
  half_width, low, high = max(e[0] for e in extents), min(e[1] for e in extents), max(e[2] for e in extents)
  for ax in axes:  # one scale for every panel, so the rings compare at a glance
    ax.set_xlim(-half_width, half_width)
    ax.set_ylim(low, high)
  titles = 1.7 if len(plans) > 1 else 1.1
  fig.set_size_inches(len(plans) * 2 * half_width * INCH_PER_UNIT, (high - low) * INCH_PER_UNIT + titles)
  if len(plans) > 1:
    fig.suptitle(f"{plans[0].model.id}: strategies compared, {plans[0].objective} objective", fontsize=15, fontweight="bold")
  try:
    fig.savefig(path)
  except (OSError, ValueError) as e:  # missing folder, no permission, an extension matplotlib cannot write
    raise BadInput(f"cannot write plot {path!r}: {getattr(e, 'strerror', None) or e}") from None


def draw_hop(ax, costs: CostModel, start: tuple, end: tuple) -> None:
  """The arrow from one ring node to the next, labelled with the hop's ms (dashed and red where the nodes share no edge); each
  end is (node id, its box, its position)."""
  (from_id, from_box, (x1, y1)), (to_id, to_box, (x2, y2)) = start, end
  seconds, joined = hop_s(costs, from_id, to_id)
  color = INK if joined else BAD
  arrow = dict(
    arrowstyle="-|>",
    mutation_scale=18,
    lw=1.6,
    color=color,
    linestyle="-" if joined else "--",
    connectionstyle=f"arc3,rad={ARC}",
    patchA=from_box.get_bbox_patch(),
    patchB=to_box.get_bbox_patch(),
  )
  ax.annotate("", xy=(x2, y2), xytext=(x1, y1), arrowprops=arrow, zorder=2)
  # midpoint of arc3's quadratic Bezier: the chord's midpoint pushed sideways by half the curvature
  mx, my = (x1 + x2) / 2 + ARC / 2 * (y2 - y1), (y1 + y2) / 2 - ARC / 2 * (x2 - x1)
  label = f"{seconds * 1000:.2f} ms" + ("" if joined else "\n(no edge)")
  ax.text(mx, my, label, ha="center", va="center", fontsize=9, color=color, bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none"), zorder=4)


def draw_ring(ax, plan: Plan, costs: CostModel, with_model: bool = True) -> tuple[float, float, float]:
  """Ring nodes clockwise from the top in execution order, hops as arrows labelled in ms; nodes left out greyed along the bottom.

  Returns the extent the drawing needs: (half width, bottom, top) in data units."""
  shards, capacities = plan.node_shards(), ring_capacities(plan, costs)
  k = len(shards)
  radius = 0.0 if k == 1 else max(1.0, MIN_CHORD / 2 / math.sin(math.pi / k))
  pos = [(radius * math.cos(a), radius * math.sin(a)) for a in (math.pi / 2 - 2 * math.pi * n / k for n in range(k))]
  boxes = []
  for n, ((node_id, shard), (x, y)) in enumerate(zip(shards, pos)):
    count, capacity = shard.get_layer_count(), capacities[node_id]
    noun = "layer" if count == 1 else "layers"
    label = f"{n + 1}. {node_id}\n{noun} {layer_range(shard)} ({count})\nstage {fmt(ms(stage_s(costs, node_id, count, n == k - 1)), unit=' ms')}"
    if count > capacity:
      label += f"\nover memory: fits {capacity}"
    style = dict(boxstyle="round,pad=0.6", fc=RING_FILL, ec=BAD if count > capacity else INK, lw=2.5 if count > capacity else 1.2)
    boxes.append(ax.text(x, y, label, ha="center", va="center", fontsize=10, color=INK, bbox=style, zorder=3))
  for n in range(k if k > 1 else 0):
    draw_hop(ax, costs, (shards[n][0], boxes[n], pos[n]), (shards[(n + 1) % k][0], boxes[(n + 1) % k], pos[(n + 1) % k]))
  if k == 1:
    ax.text(0, -0.4, "single node: no hops", ha="center", va="center", fontsize=9, color=OUT_INK)
  half_width, bottom, top = max(abs(x) for x, _ in pos) + 0.9, min(y for _, y in pos) - 0.55, max(y for _, y in pos) + 0.55
  if k == 1:
    bottom -= 0.1  # room for the note
  out = left_out(plan, costs)
  per_row = max(4, int(2 * radius / OUT_STEP) + 1)
  for n, node_id in enumerate(out):
    row, col = divmod(n, per_row)
    in_row = min(per_row, len(out) - row * per_row)
    x, y = (col - (in_row - 1) / 2) * OUT_STEP, -radius - 0.95 - 0.45 * row
    out_style = dict(boxstyle="round,pad=0.5", fc=OUT_FILL, ec="#cccccc", linestyle="--")
    ax.text(x, y, f"{node_id}\nnot in ring", ha="center", va="center", fontsize=9, color=OUT_INK, bbox=out_style, zorder=3)
    half_width, bottom = max(half_width, abs(x) + 0.5), y - 0.25
  p = plan.prediction.to_dict()
  head = f"{plan.model.id}: {plan.strategy}, {plan.objective} objective" if with_model else plan.strategy
  ax.set_title(
    f"{head}{'' if p['feasible'] else ' (INFEASIBLE)'}\n{speeds(p, 1)}",
    fontsize=12,
    color=INK if p["feasible"] else BAD,
  )
  ax.set_aspect("equal")
  ax.axis("off")
  return half_width, bottom, top
