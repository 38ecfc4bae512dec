"""A node's measured layer times: it times its engine on the model it serves before serving (calibration), refines the figures
from its own steps of requests, and publishes them with its device so that re-planning follows the engine's real speed."""

import logging
import time

from exo.base.model_spec import ModelSpec
from exo.base.shard import Shard
from exo.inference.calibration import calibrate
from exo.inference.inference_engine import InferenceEngine, Step, positions_in
from exo.inference.layer_time_estimate import LayerTimeEstimate
from exo.orchestration.cluster_view import ClusterView
from exo.topology.cost_model import head_layers

log = logging.getLogger(__name__)

__all__ = ["LayerTimeMeter"]


class LayerTimeMeter:
  def __init__(self, engine: InferenceEngine, cluster: ClusterView):
    self.engine = engine
    self.cluster = cluster  # where the figures are published: this node's capabilities, topology entry and announcements
    self._measuring: dict[str, tuple[ModelSpec, LayerTimeEstimate]] = {}  # by model id: the models whose layer times it refines
    self._calls_running = 0  # engine calls in flight on this node
    self._calls_started = 0

  async def calibrate(self, model: ModelSpec) -> None:
    """Time the engine on `model`'s layers and publish the layer times; refine them from then on with the steps of requests.
    A calibration that fails is logged and publishes nothing (the planner then uses the roofline until steps give figures)."""
    memory = self.cluster.capabilities.memory
    max_bytes = memory * 2**20 / 2 if memory > 0 else None
    try:
      measured = await calibrate(self.engine, model, max_bytes)
    except Exception as e:
      log.warning("could not measure the engine on %s: %s: %s", model.id, type(e).__name__, e)
      measured = None
    self._measuring[model.id] = (model, LayerTimeEstimate(measured))
    if measured is not None:
      log.info("engine on %s: %.4g ms a layer per decode step, %.4g ms a layer per prefill token", model.id, measured.decode_ms, measured.token_ms)
      self._publish(model.id)

  async def engine_call(self, shard: Shard, steps: list[Step], chunk: bool) -> list:
    """One engine call of the stage scheduler. A call of one step that ran alone (no other call overlapped it: the scheduler
    runs one per shard) refines the layer times of the model, if this node measures it: a decode step, or a prompt chunk. The
    last stage's step includes the head, eta layers of time, over the rows it returns (a prompt's last one only, where the step
    asks for that alone). A batch of several steps tells neither figure."""
    alone = self._calls_running == 0
    self._calls_running += 1
    self._calls_started += 1
    started, mark = time.perf_counter(), self._calls_started
    try:
      outputs = await self.engine.infer_batch(shard, steps)
    finally:
      self._calls_running -= 1
    single = len(steps) == 1 and not isinstance(outputs[0], Exception)
    if shard.model_id in self._measuring and single and alone and mark == self._calls_started:
      model, estimate = self._measuring[shard.model_id]
      eta = head_layers(model) if shard.is_last_layer() else 0.0
      rows = positions_in(steps[0].input_data)
      if estimate.add_step(time.perf_counter() - started, rows, shard.get_layer_count(), eta, 1 if steps[0].last_only else rows):
        self._publish(model.id)
    return outputs

  def _publish(self, model_id: str) -> None:
    times = self._measuring[model_id][1].value()
    if times is not None:
      self.cluster.publish(self.cluster.capabilities.with_layer_times(model_id, times))
