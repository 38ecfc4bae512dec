"""The terminal view of a running node: the chat page's address, the model it serves, the nodes it sees (a random id by its
first 8 characters; the title has the node's full id), the RTT it measures to each, each node's measured milliseconds per layer
(a decode step, on its own engine) for the model served, the model files arriving at nodes (with progress bars), the ring of the
current plan and the context it planned (per request, prompt and answer), tokens/s."""

import asyncio

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from exo.base.device_capabilities import FileTransfer
from exo.base.shard import Shard
from exo.base.wording import count, figure, short_id
from exo.orchestration.service import ServingNode


def transfers_table(transfers: list[tuple[str, FileTransfer]]) -> Table:
  """The model files arriving at nodes, each with a progress bar."""
  table = Table(title="model files arriving")
  for column in ("node", "file", "progress", "received", "from"):
    table.add_column(column)
  for node_id, t in transfers:
    table.add_row(
      short_id(node_id), t.name, ProgressBar(total=max(t.total_bytes, 1), completed=t.received_bytes, width=30),
      f"{t.received_bytes / 1e6:.1f} of {t.total_bytes / 1e6:.1f} MB", short_id(t.source) if t.source else "-",
    )  # fmt: skip
  return table


def nodes_table(node: ServingNode, model_id: str, stages: dict[str, Shard]) -> Table:
  """The nodes this one sees, with their devices, the RTT to each, their measured ms per layer of `model_id` and their stage."""
  request = node.planner_config.request
  table = Table(
    title=f"exo node {node.id}: serving {model_id}; {count(len(node.topology.nodes), 'node')}, strategy {request.strategy} ({request.objective})"
  )
  for column in ("node", "device", "memory MB", "fp16 TFLOPS", "bandwidth GB/s", "RTT ms", "ms/layer", "layers"):
    table.add_column(column)
  for node_id, caps in sorted(node.topology.nodes.items()):
    rtt = node.rtt_ms(node_id)
    shard = stages.get(node_id)
    measured = caps.layer_times.get(model_id)
    table.add_row(
      short_id(node_id) + (" (this node)" if node_id == node.id else ""),
      f"{caps.model} ({caps.chip})",
      f"{caps.memory:.0f}",
      figure(caps.flops.fp16),
      figure(caps.memory_bandwidth),
      "-" if rtt is None else f"{rtt:.2f}",
      "-" if measured is None else figure(measured.decode_ms),
      "-" if shard is None else f"{shard.start_layer}-{shard.end_layer}",
    )
  return table


class RingView:
  def __init__(self, node: ServingNode, refresh_seconds: float = 1.0, page_url: str | None = None):
    self.node, self.page_url = node, page_url
    self.refresh_seconds = refresh_seconds
    self._live: Live | None = None
    self._task: asyncio.Task | None = None

  def render(self) -> Group:
    node, plan = self.node, self.node.current_plan
    stages = {node_id: shard for node_id, shard in plan.node_shards()} if plan else {}
    table = nodes_table(node, plan.model.id if plan else node.model.id, stages)
    lines = [Text(f"Chat page: {self.page_url}", style="bold")] if self.page_url else []
    lines.append(table)
    transfers = [(node_id, t) for node_id, caps in sorted(node.topology.nodes.items()) for t in caps.transfers]
    if transfers:
      lines.append(transfers_table(transfers))
    if plan:
      lines.append(Text(f"ring: {' -> '.join(short_id(n) for n, _ in plan.node_shards())} ({plan.model.id})"))
      full = plan.model.default_context()
      lines.append(
        Text(
          f"context: {plan.context_tokens} tokens per request, prompt and answer"
          + (f" (of the model's {full})" if plan.context_tokens < full else "")
        )
      )
    waiting = node.text.engine_waiting()
    if waiting:
      lines.append(Text(f"engine: {waiting}", style="yellow"))
    load = node.load()
    lines.append(
      Text(
        f"requests: {load['active_requests']} running on this node, {load['waiting_requests']} waiting at its stage; "
        f"decode batch {load['mean_batch']:.1f} of at most {load['max_batch']}; {load['tokens_per_s']:.1f} tokens/s"
      )
    )
    last = node.last_generation
    if last and last.elapsed_s > 0:
      lines.append(
        Text(f"last request: {count(len(last.tokens), 'token')} in {last.elapsed_s:.2f} s ({len(last.tokens) / last.elapsed_s:.1f} tokens/s)")
      )
    return Group(*lines)

  def start(self) -> None:
    self._live = Live(self.render(), auto_refresh=False)
    self._live.start()
    self._task = asyncio.create_task(self._refresh())

  async def _refresh(self) -> None:
    while True:
      await asyncio.sleep(self.refresh_seconds)
      self._live.update(self.render(), refresh=True)

  def stop(self) -> None:
    if self._task:
      self._task.cancel()
    if self._live:
      self._live.stop()
