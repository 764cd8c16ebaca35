"""Experiment drivers built on the training loop: config-driven scaling sweeps."""
