"""Build a tiny, seeded Llama or Qwen2 checkpoint on disk with no network.

The result is an ordinary Hugging Face model directory (config.json, generation_config.json,
model.safetensors, tokenizer files), so everything that loads it goes through the real
``vllm.LLM(model=path)`` path and a real checkpoint works the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reinforcement learning with verifiable rewards samples groups of completions",
    "the trainer computes logprobs of the sampled tokens and takes a policy gradient step",
    "one two three four five six seven eight nine ten eleven twelve",
    "add the numbers and answer with the sum only",
    "vllm samples rollouts and returns per token logprobs to the trainer",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


def build_tokenizer(out: Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer on a fixed corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out))
    return fast


def build_tiny_model(
    out: str | Path,
    *,
    arch: str = "qwen2",
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    head_scale: float = 20.0,
    torch_dtype: str = "bfloat16",
    generation_config: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random ``arch`` ('llama' or 'qwen2') model to ``out`` and return the path.

    ``head_scale`` multiplies the random lm_head so sampling is not uniform and logits reach
    magnitudes where bf16 head rounding is visible (~0.09 max |Δ| at x30 on CPU).
    ``generation_config`` entries (temperature, top_k, ...) go to generation_config.json.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size)
    vocab = max(len(tok), vocab_size)
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=torch_dtype,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(head_scale)
    model = model.to(getattr(torch, torch_dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    # Written as plain JSON, like real checkpoints ship it (transformers' validation would
    # refuse e.g. temperature without do_sample, which vLLM reads all the same).
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    gen.update(generation_config or {})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "tracekit_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "head_scale": head_scale}, indent=2))
    return out
