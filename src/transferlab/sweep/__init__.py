"""Sweep tools: `python -m transferlab.sweep.summary <multirun dir>`."""
