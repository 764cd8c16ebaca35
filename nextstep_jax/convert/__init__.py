"""Converters from official NextStep-1 releases to this project's checkpoints."""
