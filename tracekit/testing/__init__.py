"""Helpers for tests and the demo: a tiny local model, engine start-up defaults for CPU."""
