"""SONICHU training experiments: one module per training stage, the trainer's entry points."""
