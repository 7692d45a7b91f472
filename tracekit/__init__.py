"""tracekit: record vLLM RL rollouts, replay them on another engine, attribute the drift."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TracekitError  # noqa: E402

__all__ = ["Recorder", "TracekitError", "__version__"]


def __getattr__(name: str):  # lazy: `import tracekit` stays light (no vllm/torch import)
    if name == "Recorder":
        from .capture.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'tracekit' has no attribute {name!r}")
