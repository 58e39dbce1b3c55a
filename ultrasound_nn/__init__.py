"""Layers shared by more than one model package; imports neither launch nor a model package."""
