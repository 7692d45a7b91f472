"""Capture: record a vLLM job (wrap an engine, zero-code launch, HTTP proxy, trainer hooks)."""

from __future__ import annotations

from .recorder import Recorder

__all__ = ["Recorder"]
