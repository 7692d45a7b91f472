"""Capture adapter for ``AsyncLLM`` (``AsyncLLMEngine`` in v1): streaming ``generate``.

The hook wraps the async generator: it watches every chunk (cumulative, delta or final-only
output kinds), hides the logprobs it added, and writes the sample when the stream ends —
including streams the caller abandons (finish_reason 'abort'). Per-token weight versions come
from the engine's ``weight_versions`` spans on the terminal output (vLLM >= 0.32).
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import asyncio
import datetime as _dt
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from .llm import (
    PreparedParams,
    _group_key,
    extract_logprobs,
    label_spans,
    prepare_params,
    weights_path_arg,
)
from .recorder import Hooks, Recorder, _flatten_checksums, _now
from .versions import WEIGHT_METHODS, Plan


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


class _AsyncHooks(Hooks):
    """State of one wrapped AsyncLLM. Hooks: ``generate``; ``collective_rpc`` (the job's reloads;
    vLLM's ``update_weights``/``start_weight_update``/``finish_weight_update`` call it too) and
    ``update_weight_version`` (the job's own labels; ``finish_weight_update(v)`` calls it)."""

    def __init__(self, recorder: Recorder, engine: Any, engine_args: Mapping[str, Any] | None) -> None:
        super().__init__(recorder, engine)
        self.engine_id = recorder.register_engine(engine, surface="async_llm", engine_args=engine_args)
        self.key = self.engine_id or self.key
        try:
            self.model_dir = str(engine.vllm_config.model_config.model)
        except Exception:
            self.model_dir = None
        from .fingerprint import capabilities

        caps = capabilities()
        # Engines with per-token spans need no label round trips per request.
        self.need_labels = not caps.get("weight_version_spans", False)
        self.can_checksum = bool(caps.get("compute_weight_checksums"))

    def install_all(self) -> None:
        self.orig_generate = self.install(self.engine, "generate", self.generate)
        self.orig_rpc = self.install(self.engine, "collective_rpc", self.collective_rpc)
        self.set_label = self.install(self.engine, "update_weight_version", self.update_weight_version)

    async def _label(self) -> str | None:
        if not self.need_labels:
            return None
        try:
            return await self.engine.get_weight_version()
        except Exception:
            return None

    # -------------------------------------------------------------- weight changes and labels
    async def update_weight_version(self, new_version: Any, *args: Any, **kw: Any) -> Any:
        """The job labels the engine itself (its label wins; see Versions.job_label)."""
        out = await self.set_label(new_version, *args, **kw)
        self.job_labeled(new_version)
        return out

    async def collective_rpc(self, method: Any, *args: Any, **kw: Any) -> Any:
        """Weight changes the job pushes. A reload runs inside pause_generation(mode="keep"),
        unless the engine is paused already, with tracekit's label queued right behind it: the
        engine core handles utility calls in order and runs no step while paused, so no step runs
        between the reload and the label (vLLM: "weight versions change only while generation is
        paused"). Weight-transfer sessions (start/update/finish) get an 'in flux' label first."""
        rec = self.recorder
        plan = None
        if self.live and isinstance(method, str) and method in WEIGHT_METHODS:
            try:
                plan = rec.versions.before(self.key, self.engine_id, method, weights_path_arg(args, kw), in_flight=True)
            except Exception as e:
                rec.count_error(f"observe {method}: {type(e).__name__}: {e}")
        if plan is not None and self.set_label is None:  # an engine without labels: nothing to tag
            plan = None
        if plan is None:
            return await self.orig_rpc(method, *args, **kw)
        try:
            if self.can_checksum and rec.versions.baseline_due(self.key):
                rec.versions.baseline(self.key, _flatten_checksums(await self.engine.compute_weight_checksums()))
        except Exception as e:
            rec.count_error(f"baseline checksum: {type(e).__name__}: {e}")
        notes: list[str] = []
        paused = await self._pause(plan, notes)
        try:
            # Queued back to back, in this order (each task sends its message in its first step).
            labels_first = [asyncio.ensure_future(self.set_label(plan.before))] if plan.before else []
            call = asyncio.ensure_future(self.orig_rpc(method, *args, **kw))
            # (queued whatever the call's outcome: after a failed reload the weights are unknown)
            labels_after = [asyncio.ensure_future(self.set_label(plan.label_after))] if plan.label_after else []
            try:
                out = await call
            except BaseException as e:
                await _settle(labels_first + labels_after, notes)
                self.weight_call_done(plan, ok=False, error=f"{type(e).__name__}: {e}", notes=notes)
                raise
            await _settle(labels_first + labels_after, notes)
        finally:
            if paused:
                try:
                    await self.engine.resume_generation()
                except Exception as e:
                    notes.append(f"resume_generation failed: {type(e).__name__}: {e}")
        cs = None
        if plan.complete and self.can_checksum:
            try:
                cs = _flatten_checksums(await self.engine.compute_weight_checksums())
            except Exception as e:
                notes.append(f"no engine checksum: {type(e).__name__}: {e}")
        self.weight_call_done(plan, ok=True, checksums=cs, notes=notes)
        ch = plan.change
        try:
            if rec.versions.wants_snapshot(ch):  # blob I/O off the event loop
                rec.versions.snapshot_taken(ch, await asyncio.to_thread(rec.snapshot_blobs, ch.path, None))
        except Exception as e:
            rec.count_error(f"snapshot of reloaded weights: {type(e).__name__}: {e}")
        return out

    async def _pause(self, plan: Plan, notes: list[str]) -> bool:
        """Pause (keep requests and caches) around a reload the recorder labels; True if it did."""
        if not plan.complete or plan.label_after is None or plan.change.method != "reload_weights":
            return False
        try:
            if await self.engine.is_paused():
                plan.before = None  # the job paused: nothing steps between the reload and the label
                return False
            await self.engine.pause_generation(mode="keep", clear_cache=False)
            plan.before = None
            return True
        except Exception as e:  # no pause on this engine: 'in flux' first, unknown if a step slips in
            plan.before = plan.change.flux_label
            notes.append(f"no pause around the reload ({type(e).__name__}: {e}); tokens of a step between "
                         "the reload and the label are unknown")
            return False

    # -------------------------------------------------------------- generation
    def generate(self, prompt: Any, sampling_params: Any = None, request_id: Any = None, *args: Any, **kw: Any) -> AsyncGenerator[Any, None]:
        if "sampling_params" in kw:
            sampling_params = kw.pop("sampling_params")
        if "request_id" in kw:
            request_id = kw.pop("request_id")
        if not self.live:
            return self.orig_generate(prompt, sampling_params, request_id, *args, **kw)
        return self._gen(prompt, sampling_params, request_id, args, kw)

    async def _gen(self, prompt: Any, sampling_params: Any, request_id: Any, args: tuple, kw: dict) -> AsyncGenerator[Any, None]:
        rec = self.recorder
        prep: PreparedParams | None
        try:
            prep = prepare_params(sampling_params, defaults_applied=False)
            send = prep.send
        except Exception as e:
            rec.count_error(f"async prepare: {type(e).__name__}: {e}")
            prep, send = None, sampling_params
        t0 = _now()
        try:
            changes0 = rec.versions.submit(self.key)
        except Exception as e:
            rec.count_error(f"async submit: {type(e).__name__}: {e}")
            changes0 = -1
        label0 = await self._label() if prep is not None else None
        step, group = rec.current_step, rec.current_group
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
                        rec.count_error(f"async observe: {type(e).__name__}: {e}")
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
                        fb = None
                        if self.need_labels:
                            same = rec.versions.change_count(self.key) == changes0
                            fb = (label0, await self._label() if same else None)
                        self._emit(last, samples, prep, t0, fb, step, group, request_id)
                    except Exception as e:
                        rec.count_error(f"async emit: {type(e).__name__}: {e}")

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
              fb: tuple[Any, Any] | None, step: int | None, group: str | None, request_id: Any) -> None:
        rec = self.recorder
        t1 = _now()
        gid = group if group is not None else (
            f"{rec.run_id[:8]}-{request_id}" if len(samples) > 1 else f"{rec.run_id[:8]}-{_group_key(last.prompt_token_ids)}")
        for idx, s in sorted(samples.items()):
            view = _View(list(s.ids), s.lps, s.spans)
            k = prep.num_logprobs or None
            lps, top_ids, top_lps = extract_logprobs(view, k)
            spans, why = label_spans(view, len(view.token_ids), fb)
            rec.emit_sample(
                request_id=s.rid, engine_id=self.engine_id, surface="async_llm", engine_request_id=str(last.request_id),
                prompt_token_ids=last.prompt_token_ids, output_token_ids=view.token_ids, logprobs=lps,
                weight_labels=spans, requested=prep.requested, resolved=prep.resolved,
                num_logprobs=prep.num_logprobs, finish_reason=s.finish or "abort", stop_reason=s.stop,
                num_cached_tokens=getattr(last, "num_cached_tokens", None), t_submit=t0, t_first_token=s.t_first,
                t_finish=t1, group_id=gid, sample_idx=idx, step=step, top_token_ids=top_ids, top_logprobs=top_lps,
                extra={"weight_version_unknown": [why]} if why else None,
            )


async def _settle(tasks: list[asyncio.Future], notes: list[str]) -> None:
    for r in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(r, BaseException):
            notes.append(f"could not label the engine: {type(r).__name__}: {r}")


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
    engine._tracekit_recorder = recorder
    engine._tracekit_hooks = hooks
    hooks.install_all()
    return engine


async def update_async_weights(rec: Recorder, engine: Any, version: int, source: Any, *, step: int | None,
                               snapshot: bool | None, pause: bool, reset_running_requests: bool) -> bool:
    """See Recorder.update_weights_async."""
    hooks = getattr(engine, "_tracekit_hooks", None)
    own = isinstance(hooks, _AsyncHooks) and hooks.live
    engine_id = hooks.engine_id if own else None
    model_dir = hooks.model_dir if own else None
    rpc = hooks.orig_rpc if own else engine.collective_rpc
    set_label = hooks.set_label if own else engine.update_weight_version
    t0 = _now()
    wdir = rec.weights_dir(source, model_dir)
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
            await rpc("reload_weights", kwargs={"weights_path": wdir})
        except Exception as e:
            rec.write_weight_sync(engine_id=engine_id, version=version, step=step, t_start=t0, method="reload_weights",
                                  checksums=None, ok=False, error=f"{type(e).__name__}: {e}", snapshot=False)
            raise
        try:
            await set_label(str(int(version)))
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
        if own:
            rec.versions.pushed(hooks.key, engine_id, int(version))
        cs = None
        if hasattr(engine, "compute_weight_checksums"):
            try:
                cs = await engine.compute_weight_checksums()
            except Exception:
                cs = None
        snap = rec.snapshot_version(int(version), source, step, snapshot)
        rec.write_weight_sync(engine_id=engine_id, version=version, step=step, t_start=t0, method="reload_weights",
                              checksums=_flatten_checksums(cs), ok=True, error="; ".join(notes) or None, snapshot=snap)
    except Exception as e:
        rec.count_error(f"update_weights_async record: {e}")
    return True
