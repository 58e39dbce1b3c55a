"""The runtime every model package shares: entry points (train, evaluate, predict, export, convert,
benchmark), the trainer loop, mesh and sharding, checkpointing, metric writing and measurement.

It names no model: it finds a model package through the run's config or the registry of
launch/models.py. Importing it has no side effects (the entry points' default XLA flags are set
in their `main`, launch/xla_flags.py).
"""
