"""Capture adapter for ``AsyncLLM`` (``AsyncLLMEngine`` in v1): streaming ``generate``.

The hook wraps the async generator: it watches every chunk (cumulative, delta or final-only
output kinds), hides the logprobs it added, and writes the sample when the stream ends —
including streams the caller abandons (finish_reason 'abort'). Per-token weight versions come
from the engine's ``weight_versions`` spans on the terminal output (vLLM >= 0.32).
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import datetime as _dt
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from .llm import PreparedParams, _group_key, extract_logprobs, prepare_params, token_versions
from .recorder import Recorder, _flatten_checksums, _now, parse_version


class _Sample:
    __slots__ = ("comp", "finish", "ids", "lps", "rid", "spans", "stop", "t_first")

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.comp: Any = None
        self.ids: list[int] = []
        self.lps: Any = None  # DELTA mode: accumulated logprob containers
        self.finish: str | None = None
        self.stop: Any = None
        self.spans: Any = None
        self.t_first: _dt.datetime | None = None


class _AsyncHooks:
    def __init__(self, recorder: Recorder, engine: Any, engine_args: Mapping[str, Any] | None) -> None:
        self.recorder = recorder
        self.engine = engine
        self.orig_generate = engine.generate
        self.engine_id = recorder.register_engine(engine, surface="async_llm", engine_args=engine_args)
        try:
            self.model_dir = str(engine.vllm_config.model_config.model)
        except Exception:
            self.model_dir = None
        from .fingerprint import capabilities

        # Engines with per-token spans need no label round trips per request.
        self.need_labels = not capabilities().get("weight_version_spans", False)

    async def _label(self) -> str | None:
        if not self.need_labels:
            return None
        try:
            return await self.engine.get_weight_version()
        except Exception:
            return None

    def generate(self, prompt: Any, sampling_params: Any = None, request_id: Any = None, *args: Any, **kw: Any) -> AsyncGenerator[Any, None]:
        if "sampling_params" in kw:
            sampling_params = kw.pop("sampling_params")
        if "request_id" in kw:
            request_id = kw.pop("request_id")
        return self._gen(prompt, sampling_params, request_id, args, kw)

    async def _gen(self, prompt: Any, sampling_params: Any, request_id: Any, args: tuple, kw: dict) -> AsyncGenerator[Any, None]:
        rec = self.recorder
        prep: PreparedParams | None
        try:
            prep = prepare_params(sampling_params, defaults_applied=False)
            send = prep.send
        except Exception as e:
            rec._count_error(f"async prepare: {type(e).__name__}: {e}")
            prep, send = None, sampling_params
        t0 = _now()
        label0 = await self._label() if prep is not None else None
        step, group = rec.current_step, rec._group
        delta = _kind(send) == "DELTA"
        samples: dict[int, _Sample] = {}
        last: Any = None
        agen = self.orig_generate(prompt, send, request_id, *args, **kw)
        try:
            async for out in agen:
                if prep is not None:
                    try:
                        last = out
                        self._observe(out, samples, delta, prep)
                    except Exception as e:
                        rec._count_error(f"async observe: {type(e).__name__}: {e}")
                    if prep.added:
                        for comp in out.outputs:
                            comp.logprobs = None
                            comp.cumulative_logprob = None
                yield out
        finally:
            try:
                await agen.aclose()
            finally:
                if prep is not None and last is not None:
                    try:
                        label1 = await self._label()
                        self._emit(last, samples, prep, t0, label0, label1, step, group, request_id)
                    except Exception as e:
                        rec._count_error(f"async emit: {type(e).__name__}: {e}")

    def _observe(self, out: Any, samples: dict[int, _Sample], delta: bool, prep: PreparedParams) -> None:
        now = None
        for comp in out.outputs:
            s = samples.get(comp.index)
            if s is None:
                s = samples[comp.index] = _Sample(self.recorder.new_request_id())
            try:
                comp.tracekit_request_id = s.rid
            except Exception:
                pass
            if comp.token_ids and s.t_first is None:
                s.t_first = now = now or _now()
            if delta:
                s.ids.extend(comp.token_ids)
                if comp.logprobs is not None:
                    if s.lps is None:
                        s.lps = comp.logprobs[:0] if hasattr(comp.logprobs, "start_indices") else []
                    s.lps.extend(comp.logprobs) if not hasattr(s.lps, "start_indices") else _flat_extend(s.lps, comp.logprobs)
            else:
                s.ids = comp.token_ids
                s.lps = comp.logprobs
            s.comp = comp
            if comp.finish_reason is not None:
                s.finish, s.stop = comp.finish_reason, comp.stop_reason
            if getattr(comp, "weight_versions", None):
                s.spans = comp.weight_versions

    def _emit(self, last: Any, samples: dict[int, _Sample], prep: PreparedParams, t0: _dt.datetime,
              label0: str | None, label1: str | None, step: int | None, group: str | None, request_id: Any) -> None:
        rec = self.recorder
        default = rec.initial_weight_version
        fb = (parse_version(label0, default), parse_version(label1, default))
        t1 = _now()
        gid = group if group is not None else (
            f"{rec.run_id[:8]}-{request_id}" if len(samples) > 1 else f"{rec.run_id[:8]}-{_group_key(last.prompt_token_ids)}")
        for idx, s in sorted(samples.items()):
            view = _View(list(s.ids), s.lps, s.spans)
            k = prep.num_logprobs or None
            lps, top_ids, top_lps = extract_logprobs(view, k)
            tv, vs, ve, _ = token_versions(view, len(view.token_ids), default, fb)
            rec.emit_sample(
                request_id=s.rid, engine_id=self.engine_id, surface="async_llm", engine_request_id=str(last.request_id),
                prompt_token_ids=last.prompt_token_ids, output_token_ids=view.token_ids, logprobs=lps,
                token_versions=tv, version_start=vs, version_end=ve, requested=prep.requested, resolved=prep.resolved,
                num_logprobs=prep.num_logprobs, finish_reason=s.finish or "abort", stop_reason=s.stop,
                num_cached_tokens=getattr(last, "num_cached_tokens", None), t_submit=t0, t_first_token=s.t_first,
                t_finish=t1, group_id=gid, sample_idx=idx, step=step, top_token_ids=top_ids, top_logprobs=top_lps,
            )


class _View:
    """What extract_logprobs/token_versions read from a CompletionOutput."""

    __slots__ = ("logprobs", "token_ids", "weight_versions")

    def __init__(self, ids: list[int], lps: Any, spans: Any) -> None:
        self.token_ids, self.logprobs, self.weight_versions = ids, lps, spans


def _flat_extend(dst: Any, src: Any) -> None:
    off = len(dst.logprobs)
    base = src.start_indices[0] if src.start_indices else 0
    dst.start_indices.extend(s - base + off for s in src.start_indices)
    dst.end_indices.extend(e - base + off for e in src.end_indices)
    dst.token_ids.extend(src.token_ids)
    dst.logprobs.extend(src.logprobs)
    dst.ranks.extend(src.ranks)
    dst.decoded_tokens.extend(src.decoded_tokens)


def _kind(sp: Any) -> str:
    k = getattr(sp, "output_kind", None)
    return getattr(k, "name", str(k))


def wrap_async_llm(recorder: Recorder, engine: Any, engine_args: Mapping[str, Any] | None) -> Any:
    hooks = _AsyncHooks(recorder, engine, engine_args)
    engine.generate = hooks.generate
    engine._tracekit_recorder = recorder
    engine._tracekit_hooks = hooks
    return engine


async def update_async_weights(rec: Recorder, engine: Any, version: int, source: Any, *, step: int | None,
                               snapshot: bool | None, pause: bool, reset_running_requests: bool) -> bool:
    """See Recorder.update_weights_async."""
    hooks = getattr(engine, "_tracekit_hooks", None)
    engine_id = hooks.engine_id if hooks is not None else None
    model_dir = hooks.model_dir if hooks is not None else None
    t0 = _now()
    wdir = rec._weights_dir(source, model_dir)
    notes: list[str] = []
    paused = False
    if pause and hasattr(engine, "pause_generation"):
        try:
            await engine.pause_generation(mode="keep", clear_cache=False)
            paused = True
        except Exception as e:
            notes.append(f"pause_generation failed ({type(e).__name__}): label may be off by a step")
    try:
        try:
            await engine.collective_rpc("reload_weights", kwargs={"weights_path": wdir})
        except Exception as e:
            rec.write_weight_sync(engine_id=engine_id, version=version, step=step, t_start=t0, method="reload_weights",
                                  checksums=None, ok=False, error=f"{type(e).__name__}: {e}", snapshot=False)
            raise
        try:
            await engine.update_weight_version(str(int(version)))
        except Exception as e:
            notes.append(f"no engine label: {type(e).__name__}")
        try:
            ok = await engine.reset_prefix_cache(reset_running_requests=reset_running_requests)
            if ok is False:
                notes.append("reset_prefix_cache returned False (running requests keep KV from the old weights)")
        except Exception as e:
            notes.append(f"reset_prefix_cache failed: {e}")
    finally:
        if paused:
            await engine.resume_generation()
    rec.engine_versions[engine_id or ""] = int(version)
    try:
        cs = None
        if hasattr(engine, "compute_weight_checksums"):
            try:
                cs = await engine.compute_weight_checksums()
            except Exception:
                cs = None
        snap = rec._maybe_snapshot(int(version), source, step, snapshot)
        rec.write_weight_sync(engine_id=engine_id, version=version, step=step, t_start=t0, method="reload_weights",
                              checksums=_flatten_checksums(cs), ok=True, error="; ".join(notes) or None, snapshot=snap)
    except Exception as e:
        rec._count_error(f"update_weights_async record: {e}")
    return True
