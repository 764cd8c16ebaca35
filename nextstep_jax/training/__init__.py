"""Objective, train state, jitted steps and the training loop."""
