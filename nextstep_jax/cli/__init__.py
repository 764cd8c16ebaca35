"""Thin command-line entry points: parse flags and config, call one library function."""
