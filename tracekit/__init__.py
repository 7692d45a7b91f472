"""tracekit: record vLLM RL rollouts, replay them on another engine, attribute the drift."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TracekitError  # noqa: E402

__all__ = ["TracekitError", "__version__"]
