"""Evaluators for the built-in datasets: a shapes-world detector and a digits classifier."""
