"""Text-only sources (TRL, verl): token ids come from the model's tokenizer, logprobs stay null
until a replay fills them. The tokenizer is loaded from a local directory only, never with
``trust_remote_code``: a model directory's Python files never run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SourceError


def load_tokenizer(model: str | None, stack: str) -> Any:
    if not model:
        raise SourceError(f"{stack} dumps hold text only: pass --model DIR (the run's model) to tokenize them")
    if not Path(model).is_dir():
        raise SourceError(f"{model}: not a model directory")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SourceError("tokenizing a text-only dump needs transformers (pip install 'tracekit[vllm]')") from None
    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad --model
        raise SourceError(f"{model}: cannot load its tokenizer ({str(e).splitlines()[0][:100]})") from None


def tokenize(tok: Any, texts: list[str], where: str) -> list[np.ndarray]:
    """Token ids of each text, without special tokens added (the dumps decoded with
    skip_special_tokens=True, so a BOS/EOS the engine saw is not in the text either)."""
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise SourceError(f"{where}: row {bad}: text is {type(texts[bad]).__name__}, not a string")
    if not texts:
        return []
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


TEXT_NULLS = {
    "tokens.logprob": "text-only source: no engine logprobs; a replay (`tracekit replay --model`) fills them",
    "tokens.weight_version": "the dump has no weight version",
    "requests.weight_version_start": "the dump has no weight version",
    "requests.weight_version_end": "the dump has no weight version",
    "requests.finish_reason": "not in the dump",
    "requests.stop_reason": "not in the dump",
    "requests.num_cached_tokens": "not in the dump",
    "requests.seed": "not in the dump",
    "requests.engine_request_id": "not in the dump",
    "requests.t_submit": "no timestamps in the dump",
    "requests.t_first_token": "no timestamps in the dump",
    "requests.t_finish": "no timestamps in the dump",
    "tokens.top_token_ids": "not in the dump",
    "tokens.top_logprobs": "not in the dump",
    "weights": "no weight snapshots; replay uses --model for every request",
    "weight_syncs": "no weight update events in the dump",
}

TEXT_NOTES = [
    "prompt_token_ids are re-tokenized from the decoded prompt text with --model's tokenizer; the dump "
    "decoded with skip_special_tokens=True, so chat-template special tokens are gone and the ids approximate "
    "what the engine saw",
    "output_token_ids are re-tokenized from the decoded completion text: they can differ from the sampled ids "
    "where tokenization is not unique, and an EOS the engine sampled was dropped by skip_special_tokens",
]
