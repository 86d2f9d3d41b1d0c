"""Evaluation: metrics, baselines, gates and the path measurement."""
