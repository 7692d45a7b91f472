"""Comparison views and RL metrics over a trace (per-token Δ, ratio, clip, KL, entropy)."""
