"""Experiment configs: one `get_config(arg=None)` file per experiment; fields documented in base.py."""
