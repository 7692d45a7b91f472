"""Capture adapter for the offline ``vllm.LLM`` (generate, chat, collective_rpc).

``wrap_llm`` installs recording hooks as instance attributes, so the object keeps its type and
every other attribute. When the caller did not ask for logprobs, the hook asks vLLM for the
sampled token's logprob (``logprobs=0``, flat container where the engine has one) on a clone of
the params and strips it (and ``cumulative_logprob``) from what the caller gets back.
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from . import fastlp
from .recorder import Recorder, _now, params_dict, parse_version, requested_dict


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


def prepare_params(sp: Any, *, defaults_applied: bool) -> PreparedParams:
    """Clone ``sp`` with logprobs=0 when the caller did not ask for logprobs.

    ``defaults_applied``: the caller passed None and the engine's generation_config defaults
    were used (requested = {}, resolved = the defaults).
    """
    requested = {} if defaults_applied else requested_dict(sp)
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


def token_versions(comp: Any, n: int, default: int | None, fallback: tuple[int | None, int | None]) -> tuple[list, int | None, int | None, Any]:
    """Per-token weight version from the engine's spans (vLLM >= 0.32), else the fallback.

    Fallback (engines without spans): the engine label read before and after the request; when
    they agree every token gets it, when they differ the tokens are left null (unknown).
    """
    spans = getattr(comp, "weight_versions", None)
    if spans:
        out: list = [None] * n
        labels = []
        for sp in spans:
            v = parse_version(sp.version, default)
            labels.append(sp.version)
            for i in range(max(0, sp.start), min(n, sp.end)):
                out[i] = v
        return out, (out[0] if n else parse_version(spans[0].version, default)), (out[-1] if n else None), labels
    a, b = fallback
    if a == b:
        return [a] * n, a, b, None
    return [None] * n, a, b, None


def _engine_label(llm: Any) -> str | None:
    try:
        return llm.llm_engine.get_weight_version()
    except Exception:
        return None


def _group_key(prompt_ids: Sequence[int] | None) -> str:
    h = hashlib.blake2b(repr(list(prompt_ids or ())).encode(), digest_size=6).hexdigest()
    return h


class _LLMHooks:
    """State of one wrapped LLM; its methods replace generate/chat/collective_rpc."""

    def __init__(self, recorder: Recorder, llm: Any, engine_args: Mapping[str, Any] | None) -> None:
        self.recorder = recorder
        self.llm = llm
        self.orig_generate = llm.generate
        self.orig_chat = llm.chat
        self.orig_rpc = llm.collective_rpc
        self.engine_id = recorder.register_engine(llm, surface="llm", engine_args=engine_args)
        try:
            self.model_dir = str(llm.llm_engine.vllm_config.model_config.model)
        except Exception:
            self.model_dir = None
        self.calls = 0
        from .fingerprint import capabilities

        # Engines with per-token spans (vLLM >= 0.32) need no label reads around each call.
        self.need_labels = not capabilities().get("weight_version_spans", False)
        # The label the engine's last tokens were tagged with: a reload that leaves the engine on
        # it (the job did not relabel) makes later tokens look like the old weights' tokens.
        self.label_used = _engine_label(llm)

    # -------------------------------------------------------------- param preparation
    def _prepare(self, sampling_params: Any, n_prompts: int | None) -> tuple[Any, list[PreparedParams] | PreparedParams | None]:
        try:
            if sampling_params is None:
                sp = self.llm.get_default_sampling_params()
                p = prepare_params(sp, defaults_applied=True)
                return p.send, p
            if isinstance(sampling_params, Sequence):
                cache: dict[int, PreparedParams] = {}
                preps = []
                for sp in sampling_params:
                    if id(sp) not in cache:
                        cache[id(sp)] = prepare_params(sp, defaults_applied=False)
                    preps.append(cache[id(sp)])
                return [p.send for p in preps], preps
            p = prepare_params(sampling_params, defaults_applied=False)
            return p.send, p
        except Exception as e:
            self.recorder._count_error(f"prepare params: {type(e).__name__}: {e}")
            return sampling_params, None

    def _run(self, orig: Any, first: Any, sampling_params: Any, args: tuple, kw: dict, kind: str) -> Any:
        send, prep = self._prepare(sampling_params, None)
        label_before = _engine_label(self.llm) if self.need_labels else None
        t0 = _now()
        outs = orig(first, send, *args, **kw)
        self.label_used = _engine_label(self.llm)
        if prep is not None:
            try:
                self._record(outs, prep, t0, label_before, self.label_used, kind)
            except Exception as e:
                self.recorder._count_error(f"record {kind}: {type(e).__name__}: {e}")
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

    def collective_rpc(self, method: Any, *args: Any, **kw: Any) -> Any:
        """Observe weight reloads the job pushes directly (method 'reload_weights')."""
        if method != "reload_weights":
            return self.orig_rpc(method, *args, **kw)
        t0 = _now()
        try:
            out = self.orig_rpc(method, *args, **kw)
        except Exception as e:
            self._observed_sync(t0, ok=False, error=f"{type(e).__name__}: {e}")
            raise
        self._observed_sync(t0, ok=True, error=None)
        return out

    def _observed_sync(self, t0: _dt.datetime, *, ok: bool, error: str | None) -> None:
        try:
            label = _engine_label(self.llm)
            version = parse_version(label, self.recorder.initial_weight_version)
            notes = [error] if error else []
            if version is None:
                notes.append("version label unknown (-1): use rec.update_weights")
            elif ok and label == self.label_used:
                # Not relabeled since the last tokens: the tokens that follow get the old weights'
                # version although other weights compute them.
                version = None
                notes.append(f"engine label {label!r} not changed since the last tokens (-1): later tokens "
                             "keep the old version; label the engine (llm.llm_engine.set_weight_version) "
                             "or use rec.update_weights")
            self.recorder.write_weight_sync(
                engine_id=self.engine_id, version=version if version is not None else -1, step=None,
                t_start=t0, method="collective_rpc:reload_weights", checksums=checksums_llm(self.llm, self.orig_rpc),
                ok=ok, error="; ".join(notes) or None, snapshot=False,
            )
        except Exception as e:
            self.recorder._count_error(f"observe reload: {type(e).__name__}: {e}")

    # -------------------------------------------------------------- recording
    def _record(self, outs: list, prep: Any, t0: _dt.datetime, label_before: str | None, label_after: str | None,
                kind: str) -> None:
        rec = self.recorder
        t1 = _now()
        default = rec.initial_weight_version
        fb = (parse_version(label_before, default), parse_version(label_after, default)) \
            if self.need_labels else (None, None)
        step = rec.current_step
        self.calls += 1
        call_tag = f"{rec.run_id[:8]}-{self.calls}"
        seen: dict[str, int] = {}
        for i, out in enumerate(outs):
            p = prep[i] if isinstance(prep, list) else prep
            prompt_ids = out.prompt_token_ids
            if rec._group is not None:
                gid = rec._group
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
                tv, vs, ve, labels = token_versions(comp, len(ids), default, fb)
                extra = {"kind": kind}
                if labels and any(parse_version(x, default) is None for x in labels):
                    extra["weight_version_labels"] = labels
                rec.emit_sample(
                    request_id=rid, engine_id=self.engine_id, surface="llm", engine_request_id=str(out.request_id),
                    prompt_token_ids=prompt_ids, output_token_ids=ids, logprobs=lps, token_versions=tv,
                    version_start=vs, version_end=ve, requested=p.requested, resolved=p.resolved,
                    num_logprobs=p.num_logprobs, finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                    num_cached_tokens=getattr(out, "num_cached_tokens", None), t_submit=t0, t_first_token=None,
                    t_finish=t1, group_id=gid, sample_idx=base_idx + comp.index, step=step,
                    top_token_ids=top_ids, top_logprobs=top_lps, extra=extra,
                )


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
    llm.generate = hooks.generate
    llm.chat = hooks.chat
    llm.collective_rpc = hooks.collective_rpc
    llm._tracekit_recorder = recorder
    llm._tracekit_hooks = hooks
    return llm


def update_llm_weights(rec: Recorder, llm: Any, version: int, source: Any, *, step: int | None,
                       snapshot: bool | None) -> bool:
    """See Recorder.update_weights."""
    hooks = getattr(llm, "_tracekit_hooks", None)
    rpc = hooks.orig_rpc if hooks is not None else llm.collective_rpc
    engine_id = hooks.engine_id if hooks is not None else None
    model_dir = hooks.model_dir if hooks is not None else None
    t0 = _now()
    wdir = rec._weights_dir(source, model_dir)  # bad path: raised, like vLLM would (after 3 s)
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
        llm.llm_engine.set_weight_version(str(int(version)))
    except Exception as e:
        notes.append(f"no engine label: {type(e).__name__}")
    try:
        if llm.reset_prefix_cache() is False:
            notes.append("reset_prefix_cache returned False")
    except Exception as e:
        notes.append(f"reset_prefix_cache failed: {e}")
    rec.engine_versions[engine_id or ""] = int(version)
    try:
        snap = rec._maybe_snapshot(int(version), source, step, snapshot)
        rec.write_weight_sync(engine_id=engine_id, version=version, step=step, t_start=t0, method="reload_weights",
                              checksums=checksums_llm(llm, rpc), ok=True, error="; ".join(notes) or None, snapshot=snap)
    except Exception as e:
        rec._count_error(f"update_weights record: {e}")
    return True
