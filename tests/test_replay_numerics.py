"""Shared replay numerics against vLLM's own sampler code, and the replay plan's pure parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracekit.errors import TracekitError
from tracekit.replay import ReplayError, parse_kv
from tracekit.replay.plan import parse_shard, recorded_engine_args, shard_index
from tracekit.replay.processed import entropy, is_reconstructable, processed_logprobs


def _vllm_processed(logits: torch.Tensor, ids: torch.Tensor, t: float, k: int, p: float, min_p: float) -> np.ndarray:
    """vLLM's order with its own kernels: temperature → MinP processor → apply_top_k_top_p_pytorch."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    x = logits.clone() / t
    if min_p > 0:  # MinPLogitsProcessor.apply, inlined (its constructor needs a VllmConfig)
        probs = x.softmax(-1)
        x = x.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p, float("-inf"))
    n = x.shape[0]
    kk = torch.full((n,), k) if k > 0 else None
    pp = torch.full((n,), p) if p < 1 else None
    x = apply_top_k_top_p_pytorch(x, kk, pp)
    return x.log_softmax(-1).gather(1, ids.view(-1, 1)).view(-1).numpy()


@pytest.mark.parametrize("t,k,p,min_p", [(0.7, -1, 0.9, 0.0), (1.0, 50, 1.0, 0.0), (0.5, 20, 0.8, 0.0),
                                         (1.3, -1, 0.95, 0.05), (1.0, -1, 1.0, 0.0), (0.9, 5, 1.0, 0.1)])
def test_processed_logprobs_match_vllm_sampler(t: float, k: int, p: float, min_p: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 512, generator=g) * 4
    ids = torch.randint(0, 512, (16,), generator=g)
    ids[:8] = logits[:8].argmax(-1)  # half surely kept, half often filtered out
    want = _vllm_processed(logits, ids, t, k, p, min_p)
    got = processed_logprobs(logits.log_softmax(-1).numpy(), ids.numpy(), temperature=t, top_k=k, top_p=p, min_p=min_p)
    assert np.array_equal(np.isinf(want), np.isinf(got))
    fin = np.isfinite(want)
    assert np.abs(want[fin] - got[fin]).max(initial=0.0) < 1e-5


def test_greedy_and_untouched_requests_keep_raw_logprobs() -> None:
    logits = torch.randn(4, 100) * 3
    ids = np.array([1, 2, 3, 4])
    raw = logits.log_softmax(-1).numpy()[np.arange(4), ids]
    assert np.allclose(processed_logprobs(logits, ids), raw, atol=1e-6)
    assert np.allclose(processed_logprobs(logits, ids, temperature=0.0, top_k=5), raw, atol=1e-6)


def test_entropy_of_uniform_and_peaked() -> None:
    e = entropy(np.stack([np.zeros(64), np.r_[100.0, np.zeros(63)]]))
    assert abs(e[0] - np.log(64)) < 1e-5 and e[1] < 1e-3


def test_penalties_are_declared_not_reconstructable() -> None:
    assert is_reconstructable({"temperature": 0.7, "repetition_penalty": 1.0})[0]
    ok, why = is_reconstructable({"repetition_penalty": 1.1})
    assert not ok and "repetition_penalty" in why


def test_shards_partition_request_ids_deterministically() -> None:
    ids = np.arange(1 << 40, (1 << 40) + 10_000)
    s = shard_index(ids, 4)
    assert set(s.tolist()) == {0, 1, 2, 3}
    assert np.array_equal(s, shard_index(ids, 4))
    assert min(np.bincount(s)) > 2_000  # balanced
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(TracekitError):
            parse_shard(bad)


def test_engine_arg_values_parse_as_json_else_string() -> None:
    got = parse_kv(["enable_prefix_caching=false", "max_model_len=256", "generation_config=vllm",
                    'hf_overrides={"head_dtype": "float32"}', "logprobs-mode=processed_logprobs"])
    assert got == {"enable_prefix_caching": False, "max_model_len": 256, "generation_config": "vllm",
                   "hf_overrides": {"head_dtype": "float32"}, "logprobs_mode": "processed_logprobs"}
    with pytest.raises(ReplayError):
        parse_kv(["novalue"])


def test_recorded_engine_args_pin_the_effective_numerics() -> None:
    fp = {"model": "/m", "dtype": "bfloat16", "head_dtype": "float32", "logprobs_mode": "processed_logprobs",
          "enable_prefix_caching": False, "block_size": 32, "async_scheduling": False, "max_model_len": 512,
          "max_logprobs": 20, "generation_config": '{"mode": "vllm", "override": {"top_k": 5}}',
          "engine_args": '{"seed": 0, "worker_cls": "vllm.v1.worker.cpu_worker.CPUWorker", "dtype": "auto"}'}
    a = recorded_engine_args(fp)
    assert a["dtype"] == "bfloat16" and a["hf_overrides"] == {"head_dtype": "float32"}
    assert a["generation_config"] == "vllm" and a["override_generation_config"] == {"top_k": 5}
    assert a["enable_prefix_caching"] is False and a["block_size"] == 32 and a["seed"] == 0
    assert "worker_cls" not in a
