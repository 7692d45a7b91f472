"""The toy task: a verifiable reward a tiny random model can learn within a few GRPO steps.

Reward = fraction of completion tokens that are digit tokens ("0".."20"), checked against the
tokenizer, so it is exact and cheap. A random model emits a few percent of them; a policy-gradient
step on group-normalised advantages raises that share visibly within ~5 steps.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

PROMPTS = [
    "count with me :",
    "the quick brown fox",
    "add the numbers and answer with the sum only",
    "one two three four five",
    "vllm samples rollouts and returns",
    "a b c d e f g",
    "the trainer computes logprobs of",
    "0 1 2 3 4 5",
    "reinforcement learning with verifiable rewards",
    "the lazy dog jumps over",
    "answer with a number :",
    "eleven twelve thirteen",
]


def target_token_ids(tokenizer: Any) -> set[int]:
    """Token ids whose text is a number (with or without a leading space)."""
    return {i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().isdigit()}


def reward(output_token_ids: Sequence[int], targets: set[int]) -> float:
    """Share of generated tokens that are targets (0 for an empty completion)."""
    if not output_token_ids:
        return 0.0
    return sum(1 for t in output_token_ids if t in targets) / len(output_token_ids)


def prompts_for_step(step: int, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts for ``step``, deterministic in (seed, step), cycling through PROMPTS."""
    rng = random.Random(seed * 100_003 + step)
    order = list(PROMPTS)
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def group_advantages(rewards: Sequence[float], eps: float = 1e-4) -> list[float]:
    """GRPO advantage: reward minus the group mean, over the group std (0 when all equal)."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    var = sum((r - mean) ** 2 for r in rewards) / n
    std = var**0.5
    return [(r - mean) / (std + eps) if std > 0 else 0.0 for r in rewards]
