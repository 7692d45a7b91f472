"""Ground truth: a plain Hugging Face transformers forward pass (no vLLM), float32 by default.

Used by ``replay --mode reference`` and imported by the toy trainer and attribution code, so the
trainer's logprobs and the reference replay share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .processed import entropy as _entropy
from .processed import processed_logprobs


def load_reference_model(model_dir: str | Path, *, dtype: str = "float32", head_dtype: str | None = None) -> Any:
    """Load ``model_dir`` with transformers in ``dtype`` on CPU, in eval mode.

    ``head_dtype``: dtype of the final projection (hidden states and lm_head cast to it), like
    vLLM's ``hf_overrides={"head_dtype": ...}``; None keeps ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:  # transformers >= 4.56 names it dtype; older releases only know torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=getattr(torch, dtype))
    model.eval()
    model.tracekit_head_dtype = getattr(torch, head_dtype) if head_dtype else getattr(torch, dtype)
    return model


def load_weights(model: Any, tensors: Mapping[str, Any]) -> None:
    """Copy checkpoint tensors (e.g. a verified trace snapshot) into ``model`` in place.

    A partial snapshot is fine (tensors it lacks keep their values); names it has that the model
    does not know are an error, so a snapshot from another architecture is not silently ignored.
    """
    import torch

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    unknown = [n for n in tensors if n not in params]
    if unknown:
        from ..errors import WeightsError

        raise WeightsError(f"snapshot tensors not in the reference model: {', '.join(sorted(unknown)[:5])}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def reference_logits(model: Any, token_ids: Sequence[int]) -> Any:
    """Float32 logits ``[L, V]`` of a causal forward over ``token_ids`` (row i predicts i+1)."""
    import torch

    ids = torch.as_tensor([list(token_ids)], dtype=torch.long)
    head_dtype = getattr(model, "tracekit_head_dtype", None)
    with torch.no_grad():
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        hidden = body(input_ids=ids).last_hidden_state[0]
        head = model.get_output_embeddings()
        dt = head_dtype or head.weight.dtype
        logits = torch.nn.functional.linear(
            hidden.to(dt), head.weight.to(dt), None if head.bias is None else head.bias.to(dt)
        )
    return logits.to(torch.float32)


def reference_logprobs(
    model: Any,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    *,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> dict[str, np.ndarray]:
    """Teacher-forced logprobs of ``output_ids`` after ``prompt_ids``.

    Returns ``raw`` (log_softmax of the logits), ``processed`` (under the request's
    temperature/top-k/top-p/min-p, vLLM's order; -inf when filtered out) and ``entropy`` of the
    raw distribution, one value per output token.
    """
    prompt_ids, output_ids = list(prompt_ids), list(output_ids)
    if not prompt_ids:
        raise ValueError("reference_logprobs needs at least one prompt token")
    n = len(output_ids)
    if n == 0:
        empty = np.zeros(0, dtype=np.float32)
        return {"raw": empty, "processed": empty.copy(), "entropy": empty.copy()}
    logits = reference_logits(model, prompt_ids + output_ids)[len(prompt_ids) - 1 : len(prompt_ids) - 1 + n]
    lp = logits.log_softmax(dim=-1)
    import torch

    ids = torch.as_tensor(output_ids, dtype=torch.long).view(-1, 1)
    raw = lp.gather(1, ids).view(-1).numpy().astype(np.float32)
    proc = processed_logprobs(logits, output_ids, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return {"raw": raw, "processed": proc.astype(np.float32), "entropy": _entropy(lp).astype(np.float32)}
