"""Experiments behind every plot: capacity probes, timing and memory measurement."""
