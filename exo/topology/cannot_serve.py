"""Why a cluster cannot serve a model, in one sentence a person can act on: the most layers any ring of linked nodes holds,
and what would make the model fit (more memory on which nodes, links between which nodes, a shorter context)."""

import math

from exo.base.errors import ClusterCannotServe
from exo.topology.cost_model import CostModel
from exo.topology.feasibility import Feasibility

__all__ = ["cannot_serve"]

MIN_CONTEXT = 512  # tokens: a plan reserves KV for at least this context (docs/DESIGN.md v2.1)


def _names(costs: CostModel, nodes: list[int]) -> str:
  return ", ".join(repr(costs.node_ids[i]) for i in nodes)


def _missing_links(costs: CostModel) -> tuple[list[int], list[tuple[int, int]]] | None:
  """The fewest nodes, largest capacities first, whose capacities (at their count) hold the model, and the links a ring
  through them in that order lacks; None if even all the nodes together cannot hold it."""
  for k in range(2, min(costs.size, costs.model.n_layers) + 1):
    caps = [costs.capacity(i, ring_size=k) for i in range(costs.size)]
    chosen = sorted(range(costs.size), key=lambda i: (-caps[i], i))[:k]
    if min(caps[i] for i in chosen) >= 1 and sum(caps[i] for i in chosen) >= costs.model.n_layers + 1:
      pairs = list(zip(chosen, chosen[1:] + chosen[:1]))[: k if k > 2 else 1]
      return chosen, [(a, b) for a, b in pairs if not math.isfinite(costs.hop[a, b])]
  return None


def cannot_serve(costs: CostModel, found: Feasibility, context: int, smallest: bool) -> ClusterCannotServe:
  """The error for the usable nodes of `costs`, with no plan at `context` tokens (`smallest`: no shorter context is planned);
  `found` is the feasibility search's result."""
  model = costs.model
  if costs.kv_per_layer <= 0:
    at = ""
  elif smallest and context == MIN_CONTEXT:
    at = f" even with KV for the least context a plan reserves ({MIN_CONTEXT} tokens per request)"
  else:
    at = f" with KV for a context of {context} tokens per request"
  if found.widest is None:
    reach = "no two nodes that can hold a layer are linked, and no node holds the model alone"
  else:
    reach = f"the most any ring of linked nodes holds is {found.most_layers} of its {model.n_layers} layers ({' > '.join(costs.node_ids[i] for i in found.widest)})"
  if not found.proven:
    return ClusterCannotServe(f"no plan for model {model.id!r} was found{at} within the search budget: {reach}; a plan was not proven impossible")
  advice = []
  if found.widest is not None:
    k = len(found.widest)
    per_layer = (model.layer_bytes + costs.resident_requests(k) * costs.kv_per_layer) / 2**20 / (1 - costs.params.memory_headroom)
    short = model.n_layers - found.most_layers
    advice.append(f"about {math.ceil(short * per_layer)} MB more memory among {_names(costs, found.widest)}")
  links = _missing_links(costs)
  if links is not None and links[1]:
    pairs = ", ".join(f"{costs.node_ids[a]}-{costs.node_ids[b]}" for a, b in links[1])
    advice.append(f"links {pairs} (a ring {' > '.join(costs.node_ids[i] for i in links[0])} would hold it)")
  if costs.kv_per_layer > 0 and not smallest:
    advice.append("a shorter context (--max-context)")
  return ClusterCannotServe(f"no ring can hold model {model.id!r}{at}: {reach}; it would fit with {' or '.join(advice) or 'more memory'}")
