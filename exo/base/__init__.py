"""The ground floor: the types every layer shares (a shard, a model and its table, a device and its chips, measured layer
times, the cluster's topology) and the errors exo reports. It imports nothing of exo outside itself."""
