"""Logprobs under vLLM's *processed* sampling distribution, rebuilt from raw logits.

Mirrors the V1 sampler's order (vllm/v1/sample/sampler.py): float32 → temperature → min-p
(an argmax-invariant logits processor) → top-k → top-p → log_softmax. Raw logprobs are a valid
input too: they differ from the logits by a per-row constant, which none of the steps sees.
Penalties (repetition/frequency/presence), logit bias and allowed/bad words are NOT applied:
callers must treat requests that used them as not reconstructable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SAMPLING_EPS = 1e-5  # vLLM's threshold below which a temperature means greedy


def _as_tensor(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def processed_logprobs(
    logits: Any,
    token_ids: Any,
    *,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> np.ndarray:
    """Logprob of ``token_ids[t]`` under row t's processed distribution; -inf when filtered out.

    ``logits``: ``[T, V]`` raw logits or raw logprobs (torch or numpy). Greedy temperatures
    (< 1e-5) leave the logits unscaled and untruncated, as vLLM's greedy path does.
    """
    import torch

    x = _as_tensor(logits).clone()
    if x.ndim != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(x.shape)}")
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64)).view(-1, 1)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"{ids.shape[0]} token ids for {x.shape[0]} rows")
    t = float(temperature if temperature is not None else 1.0)
    if t >= _SAMPLING_EPS:
        x = _filter(x / t, top_k=top_k, top_p=top_p, min_p=min_p)
    return x.log_softmax(dim=-1).gather(1, ids).view(-1).numpy()


def processed_distribution(
    logits: Any, *, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0
) -> Any:
    """The full processed log-distribution ``[T, V]`` (torch float32) — for samplers and tests."""
    x = _as_tensor(logits).clone()
    t = float(temperature if temperature is not None else 1.0)
    if t >= _SAMPLING_EPS:
        x = _filter(x / t, top_k=top_k, top_p=top_p, min_p=min_p)
    return x.log_softmax(dim=-1)


def _filter(x: Any, *, top_k: int | None, top_p: float | None, min_p: float | None) -> Any:
    import torch

    v = x.shape[-1]
    if min_p and min_p > 0.0:
        probs = x.softmax(dim=-1)
        thresh = probs.amax(dim=-1, keepdim=True) * float(min_p)
        x = x.masked_fill(probs < thresh, float("-inf"))
    k = int(top_k) if top_k is not None else -1
    use_k = 0 < k < v
    use_p = top_p is not None and float(top_p) < 1.0
    if not (use_k or use_p):
        return x
    x_sort, idx = x.sort(dim=-1, descending=False)
    if use_k:
        kth = x_sort[:, v - k].unsqueeze(1)  # ties with the k-th largest stay in, as in vLLM
        x_sort = x_sort.masked_fill(x_sort < kth, float("-inf"))
    if use_p:
        cum = x_sort.softmax(dim=-1).cumsum(dim=-1)
        mask = cum <= 1.0 - float(top_p)
        mask[:, -1] = False  # at least one token survives
        x_sort = x_sort.masked_fill(mask, float("-inf"))
    return torch.empty_like(x).scatter_(-1, idx, x_sort)


def entropy(logits: Any) -> np.ndarray:
    """Entropy (nats) of each row's raw distribution ``softmax(logits)``; accepts logprobs too."""
    lp = _as_tensor(logits).log_softmax(dim=-1)
    p = lp.exp()
    return -(p * lp.nan_to_num(neginf=0.0)).sum(dim=-1).numpy()


def is_reconstructable(sampling: dict[str, Any] | None) -> tuple[bool, str | None]:
    """Whether :func:`processed_logprobs` can rebuild this request's processed logprobs.

    ``sampling``: resolved SamplingParams fields. False with the reason when the request used a
    step this module does not apply (penalties, logit bias, allowed/bad words, logits processors).
    """
    s = sampling or {}
    for name, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        val = s.get(name)
        if val is not None and float(val) != neutral:
            return False, f"{name}={val} is not reconstructed"
    for name in ("logit_bias", "allowed_token_ids", "bad_words", "logits_processors"):
        if s.get(name):
            return False, f"{name} is not reconstructed"
    if s.get("min_tokens"):
        return False, "min_tokens (EOS masking) is not reconstructed"
    return True, None
