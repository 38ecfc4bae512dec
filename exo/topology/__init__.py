"""Planning layer: cost model, plan searches and partitioning strategies. Pure: no I/O beyond explicit file helpers.

Its modules by tier, lowest first; a module imports from its own tier or lower (tests/test_layers.py checks it):
1. cost_model (cost model v2), layer_split (the best split of a fixed ring), partitioning_strategy (upstream's seam).
2. search_problem (what the searches solve, and their order of plans), plan (a ring with its predictions, as JSON).
3. rings (Held-Karp tables, every cheapest ring, 2-opt), cycles (rings on sparse graphs), path_tables (Held-Karp over the
   subsets a search needs), bounds (best one- and two-node plans, bounds on the optimum).
4. exact_latency, exact_throughput, heuristic (the searches), feasibility (does any plan exist?), cannot_serve (why not).
5. search: the one dispatcher, search(problem, method="auto" | "exact" | "heuristic").
6. flops_latency_partitioning_strategy (the fork's strategy), ring_memory_weighted_partitioning_strategy (upstream's).
7. planner: make_plan, plan_for, predict_ring.
"""
