"""Capture adapter for the offline ``vllm.LLM`` (generate, chat, weight calls).

``wrap_llm`` installs recording hooks as instance attributes, so the object keeps its type and
every other attribute. When the caller did not ask for logprobs, the hook asks vLLM for the
sampled token's logprob (``logprobs=0``, flat container where the engine has one) on a clone of
the params and strips it (and ``cumulative_logprob``) from what the caller gets back. Weight
changes the job pushes itself are observed and labeled (capture/versions.py).
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import collections
import datetime as _dt
import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from . import fastlp
from .recorder import Hooks, Recorder, _now, params_dict, requested_dict, source_path
from .versions import WEIGHT_METHODS, Plan

# get_default_sampling_params results remembered (strong refs) to tell the fields the job changed.
_HANDED_OUT_MAX = 1024


class PreparedParams:
    """The caller's sampling params, the engine-side clones we send, and what we record."""

    __slots__ = ("added", "num_logprobs", "requested", "resolved", "send")

    def __init__(self, send: Any, added: bool, requested: dict, resolved: dict, num_logprobs: int | None):
        self.send = send
        self.added = added
        self.requested = requested
        self.resolved = resolved
        self.num_logprobs = num_logprobs


@functools.lru_cache(maxsize=1)
def _has_flat() -> bool:
    from vllm import SamplingParams

    return "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())


def prepare_params(sp: Any, *, defaults_applied: bool, base: Mapping[str, Any] | None = None) -> PreparedParams:
    """Clone ``sp`` with logprobs=0 when the caller did not ask for logprobs.

    ``defaults_applied``: the caller passed None and the engine's generation_config defaults
    were used (requested = {}, resolved = the defaults). ``base``: the fields ``sp`` had when
    ``get_default_sampling_params`` handed it out (requested = only what the job changed since).
    """
    requested = {} if defaults_applied else requested_dict(sp, base)
    resolved = params_dict(sp)
    num = getattr(sp, "logprobs", None)
    if num is not None:
        return PreparedParams(sp, False, requested, resolved, int(num))
    send = sp.clone()
    send.logprobs = 0
    if _has_flat():
        send.flat_logprobs = True  # the caller never sees these: cheapest container
        try:
            if fastlp.install():  # no detokenization, no per-position Python for these requests
                fastlp.mark(send)
        except Exception:
            pass
    return PreparedParams(send, True, requested, resolved, None)


def extract_logprobs(comp: Any, k: int | None) -> tuple[list, list | None, list | None]:
    """Sampled-token logprob per position (+ top-k ids/logprobs when ``k``) from a CompletionOutput."""
    lps = comp.logprobs
    ids = comp.token_ids
    if lps is None:
        return [None] * len(ids), None, None
    n = min(len(ids), len(lps))
    sampled: list = []
    top_ids: list | None = [] if k else None
    top_lps: list | None = [] if k else None
    if hasattr(lps, "start_indices"):  # FlatLogprobs: sampled token first at each position
        st, en, tid, lp = lps.start_indices, lps.end_indices, lps.token_ids, lps.logprobs
        if not k and len(lp) == len(st):  # logprobs=0: exactly one entry per position (hot path)
            return lp[:n] + [None] * (len(ids) - n), None, None
        for i in range(n):
            s = st[i]
            sampled.append(lp[s] if en[i] > s else None)
            if k:
                top_ids.append(tid[s + 1 : en[i]])
                top_lps.append(lp[s + 1 : en[i]])
    else:
        for i in range(n):
            d = lps[i]
            e = d.get(ids[i]) if d else None
            sampled.append(e.logprob if e is not None else None)
            if k:
                items = sorted(((v.rank or 0, t, v.logprob) for t, v in d.items() if v.rank is not None and v.rank <= k))
                top_ids.append([t for _, t, _ in items])
                top_lps.append([x for _, _, x in items])
    sampled.extend([None] * (len(ids) - n))
    if k:
        top_ids.extend([None] * (len(ids) - n))
        top_lps.extend([None] * (len(ids) - n))
    return sampled, top_ids, top_lps


def label_spans(comp: Any, n: int, fallback: tuple[Any, Any] | None) -> tuple[list, str | None]:
    """The engine's weight-version label spans of a completion, [(label, start, end)], for
    ``Recorder.emit_sample(weight_labels=...)``; and why they are unknown, if they are.

    vLLM >= 0.32 stamps every engine step with its label (``CompletionOutput.weight_versions``).
    Older engines: ``fallback`` = the label read before and after the request, used when they
    agree and no weight change was observed in between; else the tokens are unknown.
    """
    spans = getattr(comp, "weight_versions", None)
    if spans:
        return [(sp.version, sp.start, sp.end) for sp in spans], None
    if fallback is None:
        return [(None, 0, n)], "the engine returned no weight-version spans"
    a, b = fallback
    if a is not None and a == b:
        return [(a, 0, n)], None
    return [(None, 0, n)], "the weights changed during the request (this vLLM has no per-token spans)"


def _engine_label(llm: Any) -> str | None:
    try:
        return llm.llm_engine.get_weight_version()
    except Exception:
        return None


def _group_key(prompt_ids: Sequence[int] | None) -> str:
    h = hashlib.blake2b(repr(list(prompt_ids or ())).encode(), digest_size=6).hexdigest()
    return h


class _LLMHooks(Hooks):
    """State of one wrapped LLM. Hooks: ``generate``/``chat``/``get_default_sampling_params`` on
    the LLM; ``collective_rpc``/``set_weight_version`` on its ``llm_engine``, which every weight
    call goes through (``llm.collective_rpc``, ``llm.update_weights``/``finish_weight_update``/
    ``update_weight_version`` of vLLM's RL API, or the job calling ``llm.llm_engine`` directly)."""

    def __init__(self, recorder: Recorder, llm: Any, engine_args: Mapping[str, Any] | None) -> None:
        super().__init__(recorder, llm)
        self.llm = llm
        self.engine_id = recorder.register_engine(llm, surface="llm", engine_args=engine_args)
        self.key = self.engine_id or self.key
        try:
            self.model_dir = str(llm.llm_engine.vllm_config.model_config.model)
        except Exception:
            self.model_dir = None
        self.calls = 0
        from .fingerprint import capabilities

        # Engines with per-token spans (vLLM >= 0.32) need no label reads around each call.
        self.need_labels = not capabilities().get("weight_version_spans", False)
        # SamplingParams handed out by get_default_sampling_params: id -> (object, fields then).
        self.handed_out: collections.OrderedDict[int, tuple[Any, dict]] = collections.OrderedDict()

    def install_all(self) -> None:
        llm, eng = self.llm, self.llm.llm_engine
        self.orig_generate = self.install(llm, "generate", self.generate)
        self.orig_chat = self.install(llm, "chat", self.chat)
        self.orig_defaults = self.install(llm, "get_default_sampling_params", self.get_default_sampling_params)
        # orig_rpc / set_label: the engine's own methods, for the recorder's calls (never observed)
        self.orig_rpc = self.install(eng, "collective_rpc", self.engine_collective_rpc)
        self.set_label = self.install(eng, "set_weight_version", self.engine_set_weight_version)

    # -------------------------------------------------------------- sampling params
    def get_default_sampling_params(self, *args: Any, **kw: Any) -> Any:
        sp = self.orig_defaults(*args, **kw)
        if self.live:
            try:  # strong refs, bounded: msgspec Structs take no attributes and no weakrefs
                self.handed_out[id(sp)] = (sp, params_dict(sp))
                while len(self.handed_out) > _HANDED_OUT_MAX:
                    self.handed_out.popitem(last=False)
            except Exception as e:
                self.recorder.count_error(f"default params: {type(e).__name__}: {e}")
        return sp

    def _prep(self, sp: Any) -> PreparedParams:
        entry = self.handed_out.get(id(sp))
        base = entry[1] if entry is not None and entry[0] is sp else None
        return prepare_params(sp, defaults_applied=False, base=base)

    def _prepare(self, sampling_params: Any) -> tuple[Any, list[PreparedParams] | PreparedParams | None]:
        try:
            if sampling_params is None:
                p = prepare_params(self.orig_defaults(), defaults_applied=True)
                return p.send, p
            if isinstance(sampling_params, Sequence):
                cache: dict[int, PreparedParams] = {}
                preps = []
                for sp in sampling_params:
                    if id(sp) not in cache:
                        cache[id(sp)] = self._prep(sp)
                    preps.append(cache[id(sp)])
                return [p.send for p in preps], preps
            p = self._prep(sampling_params)
            return p.send, p
        except Exception as e:
            self.recorder.count_error(f"prepare params: {type(e).__name__}: {e}")
            return sampling_params, None

    # -------------------------------------------------------------- generation
    def _run(self, orig: Any, first: Any, sampling_params: Any, args: tuple, kw: dict, kind: str) -> Any:
        if not self.live:
            return orig(first, sampling_params, *args, **kw)
        send, prep = self._prepare(sampling_params)
        versions = self.recorder.versions
        fb = None
        try:
            changes0 = versions.submit(self.key)
        except Exception:
            changes0 = None
        label_before = _engine_label(self.llm) if self.need_labels else None
        t0 = _now()
        outs = orig(first, send, *args, **kw)
        if prep is not None:
            try:
                if self.need_labels:
                    same = changes0 is not None and versions.change_count(self.key) == changes0
                    fb = (label_before, _engine_label(self.llm) if same else None)
                self._record(outs, prep, t0, fb, kind)
            except Exception as e:
                self.recorder.count_error(f"record {kind}: {type(e).__name__}: {e}")
            finally:
                _strip(outs, prep)
        return outs

    def generate(self, prompts: Any, sampling_params: Any = None, *args: Any, **kw: Any) -> Any:
        if "sampling_params" in kw:  # caller passed it by keyword
            sampling_params = kw.pop("sampling_params")
        return self._run(self.orig_generate, prompts, sampling_params, args, kw, "generate")

    def chat(self, messages: Any, sampling_params: Any = None, *args: Any, **kw: Any) -> Any:
        if "sampling_params" in kw:
            sampling_params = kw.pop("sampling_params")
        return self._run(self.orig_chat, messages, sampling_params, args, kw, "chat")

    # -------------------------------------------------------------- weight changes and labels
    def engine_set_weight_version(self, label: Any, *args: Any, **kw: Any) -> Any:
        """The job labels the engine itself (its label wins; see Versions.job_label)."""
        out = self.set_label(label, *args, **kw)
        self.job_labeled(label)
        return out

    def engine_collective_rpc(self, method: Any, *args: Any, **kw: Any) -> Any:
        """Weight changes the job pushes (reload_weights, weight-transfer calls): the engine is
        labeled right after the call returns; nothing of the engine runs in between."""
        rec = self.recorder
        plan = None
        if self.live and isinstance(method, str) and method in WEIGHT_METHODS:
            try:
                in_flight = bool(self.llm.llm_engine.has_unfinished_requests())  # enqueue(): steps may run
            except Exception:
                in_flight = True
            try:
                plan = rec.versions.before(self.key, self.engine_id, method, weights_path_arg(args, kw),
                                           in_flight=in_flight)
            except Exception as e:
                rec.count_error(f"observe {method}: {type(e).__name__}: {e}")
        if plan is None:
            return self.orig_rpc(method, *args, **kw)
        try:
            if rec.versions.baseline_due(self.key):
                rec.versions.baseline(self.key, checksums_llm(self.llm, self.orig_rpc))
        except Exception as e:
            rec.count_error(f"baseline checksum: {type(e).__name__}: {e}")
        notes = [] if plan.before is None else self._label(plan.before)
        try:
            out = self.orig_rpc(method, *args, **kw)
        except Exception as e:
            if plan.label_after is not None:  # the weights may be half-changed: unknown from here on
                self._label(plan.change.label)
            self._after(plan, ok=False, error=f"{type(e).__name__}: {e}")
            raise
        if plan.label_after is not None:
            notes += self._label(plan.label_after)
        self._after(plan, ok=True, notes=notes)
        return out

    def _label(self, label: str) -> list[str]:
        try:
            self.set_label(label)
            return []
        except Exception as e:
            return [f"could not label the engine: {type(e).__name__}: {e}"]

    def _after(self, plan: Plan, *, ok: bool, error: str | None = None, notes: Sequence[str] = ()) -> None:
        rec = self.recorder
        cs = checksums_llm(self.llm, self.orig_rpc) if ok and plan.complete else None
        self.weight_call_done(plan, ok=ok, error=error, checksums=cs, notes=notes)
        try:
            if ok and rec.versions.wants_snapshot(plan.change):
                rec.versions.snapshot_taken(plan.change, rec.snapshot_blobs(plan.change.path, None))
        except Exception as e:
            rec.count_error(f"snapshot of reloaded weights: {type(e).__name__}: {e}")

    # -------------------------------------------------------------- recording
    def _record(self, outs: list, prep: Any, t0: _dt.datetime, fb: tuple[Any, Any] | None, kind: str) -> None:
        rec = self.recorder
        t1 = _now()
        step = rec.current_step
        self.calls += 1
        call_tag = f"{rec.run_id[:8]}-{self.calls}"
        seen: dict[str, int] = {}
        for i, out in enumerate(outs):
            p = prep[i] if isinstance(prep, list) else prep
            prompt_ids = out.prompt_token_ids
            if rec.current_group is not None:
                gid = rec.current_group
            elif len(out.outputs) > 1:
                gid = f"{call_tag}-{i}"
            else:  # n=1: identical prompts in one call form a group (GRPO repeats the prompt)
                gid = f"{call_tag}-{_group_key(prompt_ids)}"
            base_idx = seen.get(gid, 0)
            seen[gid] = base_idx + len(out.outputs)
            for comp in out.outputs:
                rid = rec.new_request_id()
                try:
                    comp.tracekit_request_id = rid
                except Exception:
                    pass
                ids = list(comp.token_ids)
                k = p.num_logprobs or None
                lps, top_ids, top_lps = extract_logprobs(comp, k)
                spans, why = label_spans(comp, len(ids), fb)
                extra: dict[str, Any] = {"kind": kind}
                if why:
                    extra["weight_version_unknown"] = [why]
                rec.emit_sample(
                    request_id=rid, engine_id=self.engine_id, surface="llm", engine_request_id=str(out.request_id),
                    prompt_token_ids=prompt_ids, output_token_ids=ids, logprobs=lps, weight_labels=spans,
                    requested=p.requested, resolved=p.resolved,
                    num_logprobs=p.num_logprobs, finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                    num_cached_tokens=getattr(out, "num_cached_tokens", None), t_submit=t0, t_first_token=None,
                    t_finish=t1, group_id=gid, sample_idx=base_idx + comp.index, step=step,
                    top_token_ids=top_ids, top_logprobs=top_lps, extra=extra,
                )


def weights_path_arg(args: tuple, kw: dict) -> str | None:
    """``weights_path`` of a collective_rpc('reload_weights', timeout, args, kwargs) call."""
    try:
        kwargs = kw.get("kwargs", args[2] if len(args) > 2 else None)
        path = (kwargs or {}).get("weights_path")
        if path is None:  # reload_weights(weights_iterator, weights_path, ...) positionally
            rpc_args = kw.get("args", args[1] if len(args) > 1 else ())
            path = rpc_args[1] if len(rpc_args) > 1 and isinstance(rpc_args[1], (str, os.PathLike)) else None
        return source_path(path) if path is not None else None
    except Exception:
        return None


def _strip(outs: Any, prep: Any) -> None:
    """Hide the logprobs the recorder added, so the caller sees what it would have seen."""
    try:
        for i, out in enumerate(outs):
            p = prep[i] if isinstance(prep, list) else prep
            if p.added:
                for comp in out.outputs:
                    comp.logprobs = None
                    comp.cumulative_logprob = None
    except Exception:
        pass


def checksums_llm(llm: Any, rpc: Any = None) -> Any:
    """Engine-side per-tensor checksums (vLLM >= 0.32), None where the engine cannot checksum."""
    try:
        from .fingerprint import capabilities

        if not capabilities().get("compute_weight_checksums"):
            return None
        return (rpc or llm.collective_rpc)("compute_weight_checksums")
    except Exception:
        return None


def wrap_llm(recorder: Recorder, llm: Any, engine_args: Mapping[str, Any] | None) -> Any:
    hooks = _LLMHooks(recorder, llm, engine_args)
    llm._tracekit_recorder = recorder
    llm._tracekit_hooks = hooks
    hooks.install_all()
    return llm


def update_llm_weights(rec: Recorder, llm: Any, version: int, source: Any, *, step: int | None,
                       snapshot: bool | None) -> bool:
    """See Recorder.update_weights."""
    hooks = getattr(llm, "_tracekit_hooks", None)
    own = isinstance(hooks, _LLMHooks) and hooks.live
    rpc = hooks.orig_rpc if own else llm.collective_rpc
    set_label = hooks.set_label if own else llm.llm_engine.set_weight_version
    engine_id = hooks.engine_id if own else None
    model_dir = hooks.model_dir if own else None
    t0 = _now()
    wdir = rec.weights_dir(source, model_dir)  # bad path: raised, like vLLM would (after 3 s)
    try:
        rpc("reload_weights", kwargs={"weights_path": wdir})
    except Exception as e:
        try:
            rec.write_weight_sync(engine_id=engine_id, version=version, step=step, t_start=t0, method="reload_weights",
                                  checksums=checksums_llm(llm, rpc), ok=False, error=f"{type(e).__name__}: {e}", snapshot=False)
        except Exception:
            pass
        raise
    notes = []
    try:
        set_label(str(int(version)))
    except Exception as e:
        notes.append(f"no engine label: {type(e).__name__}")
    try:
        if llm.reset_prefix_cache() is False:
            notes.append("reset_prefix_cache returned False")
    except Exception as e:
        notes.append(f"reset_prefix_cache failed: {e}")
    rec.engine_versions[engine_id or ""] = int(version)
    try:
        if own:
            rec.versions.pushed(hooks.key, engine_id, int(version))
        snap = rec.snapshot_version(int(version), source, step, snapshot)
        rec.write_weight_sync(engine_id=engine_id, version=version, step=step, t_start=t0, method="reload_weights",
                              checksums=checksums_llm(llm, rpc), ok=True, error="; ".join(notes) or None, snapshot=snap)
    except Exception as e:
        rec.count_error(f"update_weights record: {e}")
    return True
