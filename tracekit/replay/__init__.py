"""Replay a recorded trace on another vLLM version or configuration (see docs/replay.md)."""
