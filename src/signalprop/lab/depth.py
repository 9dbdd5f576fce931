"""Depth sweeps (filled in by the critical-initialization work)."""
