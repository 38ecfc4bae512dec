"""Planning layer: topology, model specs, cost model and partitioning strategies. Pure: no I/O beyond explicit file helpers."""
