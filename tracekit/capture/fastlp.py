"""Cheap sampled-token logprobs for requests the recorder itself added ``logprobs=0`` to.

When the caller did not ask for logprobs, the recorder sends ``logprobs=0`` (flat container) and
hides the result again. vLLM's front end (``LogprobsProcessor`` in the caller's process, both for
in-process and multiprocess engines) then detokenizes every logprob entry (one ``decode`` per
token, plus several more for byte-fallback tokens ending in U+FFFD) and walks each position in
Python. Nobody reads those strings: the recorder only keeps the sampled token's float.

``install()`` wraps ``LogprobsProcessor.from_new_request`` once. For a request whose sampling
params carry ``extra_args[MARK]`` (set only by ``prepare_params`` on the clone it sends) and
``logprobs == 0`` with a ``FlatLogprobs`` container, the processor gets no tokenizer and a
vectorised update that appends the same floats vLLM would (``ndarray.tolist()`` of the same
float32 row, so bitwise equal), with ``decoded_token=None``. Every other request keeps vLLM's own
code. Anything unexpected (other vLLM layout, other shapes) falls back to vLLM's code path,
silently; the install itself never raises.
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import threading
import types
from typing import Any

MARK = "tracekit_added_logprobs"

_lock = threading.Lock()
_state: dict[str, Any] = {"installed": None}
_orig_update: Any = None


def _fast_update(self: Any, logprobs_lists: Any) -> None:
    """vLLM's ``_update_sample_logprobs`` for logprobs=0 + FlatLogprobs, without per-position work.

    Same floats (``item()``/``tolist()`` of the same float32 arrays), same token ids and ranks, same
    left-to-right cumulative sum; ``decoded_token`` is None (nobody reads it). Shapes other than
    one entry per position go to vLLM's own code.
    """
    try:
        lp_np, ids_np, ranks_np = logprobs_lists[1], logprobs_lists[0], logprobs_lists[2]
        flat = self.logprobs
        cum = self.cumulative_logprob
        base = len(flat.logprobs)
        if lp_np.size == 1 and ids_np.size == 1 and ranks_np.size == 1:
            # one new token per request per engine step: the common case. ndarray.item() gives
            # the same Python float as vLLM's tolist()[0] (exact float32 -> float64 widening).
            v = lp_np.item()
            t = ids_np.item()
            r = ranks_np.item()
            flat.start_indices.append(base)
            flat.end_indices.append(base + 1)
            flat.token_ids.append(t)
            flat.logprobs.append(v)
            flat.ranks.append(r)
            flat.decoded_tokens.append(None)
            self.cumulative_logprob = cum + v
            return None
        vals = lp_np.ravel().tolist()
        ids = ids_np.ravel().tolist()
        ranks = ranks_np.tolist()
        n = len(vals)
        if n != len(ids) or n != len(ranks):
            raise ValueError("not one logprob per position")
    except Exception:
        return _orig_update(self, logprobs_lists)
    for v in vals:  # same left-to-right float sums as vLLM's loop
        cum += v
    self.cumulative_logprob = cum
    flat.start_indices.extend(range(base, base + n))
    flat.end_indices.extend(range(base + 1, base + n + 1))
    flat.token_ids.extend(ids)
    flat.logprobs.extend(vals)
    flat.ranks.extend(ranks)
    flat.decoded_tokens.extend([None] * n)
    return None


def install() -> bool:
    """Wrap vLLM's LogprobsProcessor once; True when the fast path is available."""
    if _state["installed"] is not None:
        return _state["installed"]
    with _lock:
        if _state["installed"] is not None:
            return _state["installed"]
        ok = False
        try:
            ok = _install()
        except Exception:
            ok = False
        _state["installed"] = ok
        return ok


def _install() -> bool:
    global _orig_update
    from vllm.logprobs import FlatLogprobs
    from vllm.v1.engine import logprobs as lpmod

    cls = lpmod.LogprobsProcessor
    if getattr(cls, "_tracekit_fastlp", False):
        return True
    orig_new = cls.__dict__.get("from_new_request")
    orig_update = cls.__dict__.get("_update_sample_logprobs")
    if not isinstance(orig_new, classmethod) or not callable(orig_update):
        return False
    fields = getattr(cls, "__dataclass_fields__", {})
    if not {"tokenizer", "logprobs", "cumulative_logprob", "num_logprobs"} <= set(fields):
        return False
    flat_attrs = ("start_indices", "end_indices", "token_ids", "logprobs", "ranks", "decoded_tokens")
    if not all(a in getattr(FlatLogprobs, "__dataclass_fields__", {}) for a in flat_attrs):
        return False
    new_func = orig_new.__func__
    _orig_update = orig_update

    def from_new_request(klass: Any, tokenizer: Any, request: Any, *a: Any, **kw: Any) -> Any:
        proc = new_func(klass, tokenizer, request, *a, **kw)
        try:
            sp = request.sampling_params
            ea = sp.extra_args
            if ea and ea.get(MARK) and proc.num_logprobs == 0 and type(proc.logprobs) is FlatLogprobs \
                    and not len(proc.logprobs):
                proc.tokenizer = None  # even the fallback path then skips detokenization
                proc._update_sample_logprobs = types.MethodType(_fast_update, proc)
        except Exception:
            pass
        return proc

    cls.from_new_request = classmethod(from_new_request)
    cls._tracekit_fastlp = True
    return True


def mark(send: Any) -> None:
    """Tag the engine-side clone of the params (the caller's object is never touched)."""
    ea = getattr(send, "extra_args", None)
    send.extra_args = {**ea, MARK: 1} if ea else {MARK: 1}
