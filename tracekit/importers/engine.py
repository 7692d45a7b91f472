"""The ``engines`` row of an imported run: what its run config says the engine was started with.

No live engine is fingerprinted, so versions, platform, device and environment stay null; the
columns the config states (dtype, logprobs_mode, prefix caching, async scheduling, max_model_len,
generation_config mode) are filled, and vLLM's own defaults apply to flags the config leaves out
(the launcher passes only what it sets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..capture.fingerprint import model_hash, read_generation_config, server_defaults


def engine_row(engine_id: str, args: dict[str, Any], model: str | None, *, known: bool,
               engine: str = "vllm", extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(engines row, generation_config sampling defaults the engine applied or None if unknown).

    ``args``: engine flags with vLLM's names (underscores); ``known``: the run config was read,
    so a flag it leaves out has vLLM's default."""
    local = model is not None and Path(str(model)).is_dir()
    gen_mode = args.get("generation_config", "auto") if known else None
    if gen_mode == "vllm":
        defaults: dict[str, Any] | None = {}
        gen_file: dict[str, Any] | None = {}
    elif gen_mode is None:
        defaults, gen_file = None, None
    else:
        src = model if gen_mode == "auto" else gen_mode
        gen_file = read_generation_config(src) if src and Path(str(src)).is_dir() else None
        defaults = server_defaults(gen_file, args.get("override_generation_config")) if gen_file is not None else None
    is_vllm = engine == "vllm"
    row = {
        "engine_id": engine_id,
        "role": "record",
        "surface": "import",
        "model": str(model) if model else None,
        "model_hash": model_hash(model) if local else None,
        "dtype": args.get("dtype"),
        "logprobs_mode": args.get("logprobs_mode", "raw_logprobs" if known and is_vllm else None),
        "enable_prefix_caching": args.get("enable_prefix_caching"),
        "block_size": args.get("block_size"),
        "async_scheduling": args.get("async_scheduling"),
        "max_model_len": _int(args.get("max_model_len")),
        "max_logprobs": _int(args.get("max_logprobs")),
        "head_dtype": (args.get("hf_overrides") or {}).get("head_dtype") if isinstance(args.get("hf_overrides"), dict) else None,
        "generation_config": {"mode": gen_mode, "override": args.get("override_generation_config") or {},
                              "file": gen_file} if gen_mode is not None else None,
        "default_sampling_params": defaults,
        "engine_args": args or None,
        "extra": {k: v for k, v in (extra or {}).items() if v is not None} or None,
    }
    return row, defaults


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


_NOT_FINGERPRINTED = ("vllm_version", "torch_version", "transformers_version", "python_version", "platform",
                      "device_name", "env", "capabilities")


def note_engine_nulls(sink: Any, stack: str, row: dict[str, Any]) -> None:
    """Why the engine columns an import cannot fill are null."""
    for c in _NOT_FINGERPRINTED:
        sink.null(f"engines.{c}", f"no live engine to fingerprint: {stack} does not record it")
    if row.get("model_hash") is None:
        sink.null("engines.model_hash", "the model directory is not on this machine (pass --model)")
    if row.get("default_sampling_params") is None:
        sink.null("engines.default_sampling_params",
                  "unknown: generation_config mode 'auto' needs the model's generation_config.json (pass --model)")
    for c in ("logprobs_mode", "enable_prefix_caching", "async_scheduling", "dtype", "block_size", "max_model_len",
              "max_logprobs", "head_dtype"):
        if row.get(c) is None:
            sink.null(f"engines.{c}", "not set in the run config (the engine's own default applied, "
                                      "which depends on its version)")
