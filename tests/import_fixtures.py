"""Rollout dumps written the way each stack writes them, for the importer tests.

Each writer reproduces the cited source's writer: same field names and order, nesting, dtypes,
file names and serializer settings. Only the stack's own objects (pydantic models, dataclasses,
Ray, Hydra) are replaced by the plain values they serialize to.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------- PipelineRL @58d3934
MASKED_TOKEN_ID = -100  # pipelinerl/finetune/data.py


def orjson_dumps(obj: Any) -> str:
    """``orjson.dumps(obj, option=OPT_SERIALIZE_NUMPY).decode("utf-8")`` (pipelinerl/streams.py
    ``FileStreamWriter.write``): compact separators, UTF-8 text, NaN/±inf as null, shortest
    round-trip float repr (orjson prints 1e-7 where Python prints 1e-07: the same double)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def training_text(tok: Any, messages: list[dict[str, Any]], content: str, token_ids: Sequence[int],
                  logprobs: Sequence[float], finish_reason: str | None, prompt_tokens: int,
                  output_tokens: int) -> dict[str, Any]:
    """``make_training_text(llm, llm_call).model_dump()`` for a text-only model
    (pipelinerl/async_llm.py; field order of pipelinerl/rollouts.py ``TrainingText``)."""
    full = messages + [{"role": "assistant", "content": content or ""}]
    prompt_text = tok.apply_chat_template(conversation=messages, tokenize=False, add_generation_prompt=True)
    text = tok.apply_chat_template(full, tokenize=False)
    ids = tok.apply_chat_template(messages, add_special_tokens=True, add_generation_prompt=True)
    prompt_token_ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a dict
    output_text = text[len(prompt_text):]
    if tok.bos_token and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token):]
    labels = list(token_ids)
    input_ids = prompt_token_ids + labels
    labels = [MASKED_TOKEN_ID] * len(prompt_token_ids) + labels
    if finish_reason is not None:
        finished = finish_reason != "length"
    else:
        eos = tok.eos_token or ""
        finished = bool(eos) and (content or "").endswith(eos)
    return {
        "text": text, "n_predicted": len(output_text), "reward": 0.0, "logprobs": list(logprobs),
        "ref_logprobs": [], "input_ids": input_ids, "labels": labels, "group_id": None, "finished": finished,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "visual_features": None, "metadata": {},
    }


def pipelinerl_group(texts: list[dict[str, Any]], *, scheduler: str, group: int, model_version: int,
                     rewards: Sequence[float], seed: int = 0) -> list[dict[str, Any]]:
    """One line's records: actor.py ``rollout_and_maybe_produce_result`` stamps metadata and the
    group id on every rollout's texts, ``apply_rollout_reward`` sets the reward, and the finished
    group is ``random.shuffle``d before ``ActorLoop._run`` dumps it."""
    rollouts = []
    for rollout_index, (t, r) in enumerate(zip(texts, rewards)):
        t = dict(t, reward=r, group_id=f"{scheduler}_{group}")
        t["metadata"] = {"model_version": model_version, "rollout_index": rollout_index, "step_index": 0}
        rollouts.append([t])
    random.Random(seed).shuffle(rollouts)
    return [t for texts_ in rollouts for t in texts_]


def write_pipelinerl_stream(exp: Path, lines: list[list[dict[str, Any]]], topic: str = "actor") -> Path:
    """``<exp>/streams/<topic>/0/0/0.jsonl`` (streams.py ``stream_dir``/``stream_file``), opened
    in append mode, one orjson line + "\\n" per group, flushed."""
    d = exp / "streams" / topic / "0" / "0"
    d.mkdir(parents=True, exist_ok=True)
    p = d / "0.jsonl"
    with open(p, "a") as f:
        for line in lines:
            f.write(orjson_dumps(line))
            f.write("\n")
            f.flush()
    return p


def write_pipelinerl_config(exp: Path, cfg: dict[str, Any]) -> Path:
    """``OmegaConf.save(cfg, <exp>/conf/exp_config.yaml)`` (launch.py ``main``): plain YAML."""
    import yaml

    d = exp / "conf"
    d.mkdir(parents=True, exist_ok=True)
    p = d / "exp_config.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


PIPELINERL_BASE_VLLM_KWARGS = {  # conf/base.yaml vllm_config.vllm_kwargs
    "dtype": "bfloat16", "gpu-memory-utilization": 0.9, "max-num-seqs": "${actor.llm_max_rollouts}",
    "max-num-batched-tokens": 1024, "logprobs-mode": "processed_logprobs", "enable-prefix-caching": False,
    "async-scheduling": False, "enable-chunked-prefill": "", "return-tokens-as-token-ids": "",
    "tensor-parallel-size": 1, "pipeline-parallel-size": 1, "generation-config": "vllm", "max_model_len": 10000,
}


# ---------------------------------------------------------------------- slime @624b824a8
def slime_sample(*, group_index: int, index: int, prompt: str, tokens: list[int], response: str,
                 response_length: int, reward: Any, loss_mask: list[int] | None, weight_versions: list[str],
                 rollout_log_probs: list[float] | None, status: str = "completed", label: str | None = None,
                 cached_tokens: int = 0, prompt_tokens: int = 0, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """``Sample.to_dict()`` (slime/utils/types.py): the dataclass ``__dict__`` in field order,
    ``status`` as its value, ``spec_info``/``prefix_cache_info`` as dicts."""
    return {
        "group_index": group_index, "index": index, "rollout_id": None, "prompt": prompt, "tokens": tokens,
        "multimodal_inputs": None, "multimodal_train_inputs": None, "multimodal_train_input_id": None,
        "apply_chat_template_kwargs": {}, "response": response, "response_length": response_length,
        "label": label, "reward": reward, "loss_mask": loss_mask, "weight_versions": weight_versions,
        "rollout_log_probs": rollout_log_probs, "rollout_top_p_token_ids": None,
        "rollout_top_p_token_offsets": None, "rollout_routed_experts": None, "remove_sample": False,
        "teacher_log_probs": None, "status": status, "metadata": metadata or {}, "generate_function_path": None,
        "custom_rm_path": None, "train_metadata": None, "session_id": None, "non_generation_time": 0.0,
        "spec_info": {"spec_accept_token_num": 0, "spec_draft_token_num": 0, "spec_verify_ct": 0,
                      "completion_token_num": 0},
        "prefix_cache_info": {"cached_tokens": cached_tokens, "total_prompt_tokens": prompt_tokens},
    }


def write_slime_rollout(template: str, rollout_id: int, samples: list[dict[str, Any]], *, evaluation: bool = False) -> Path:
    """slime/observability/rollout_data_utils.py ``save_debug_rollout_data``."""
    import torch

    path = Path(template.format(rollout_id=("eval_" if evaluation else "") + str(rollout_id)))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"rollout_id": rollout_id, "samples": samples}, path)
    return path


_LAYOUT_FIELDS = ("micro_batch_indices", "num_microbatches", "global_batch_sizes")
_WHOLE_BATCH_FIELDS = ("raw_reward",)


def _is_per_sample(value: Any, num_samples: int) -> bool:
    import torch

    if torch.is_tensor(value):
        return value.dim() >= 1 and value.size(0) == num_samples
    if isinstance(value, (list, tuple)):
        return len(value) == num_samples
    return False


def slime_train_payload(dp_shards: list[dict[str, Any]], *, rollout_id: int, writer_rank: int) -> dict[str, Any]:
    """slime/observability/train_data_utils.py ``_build_dump_payload``, line for line: the gathered
    per-rank ``rollout_data`` transposed into one dict per trained sample, sorted by its
    position in the rollout dump (``partition``)."""
    samples = []
    layout = []
    whole_batch: dict[str, Any] = {}
    id_columns = {"sample_indices": "sample_index", "partition": "rollout_position"}
    for shard in dp_shards:
        rollout_data = shard["rollout_data"]
        dp_rank = shard["data_parallel_rank"]
        num_local = len(rollout_data["response_lengths"])
        shard_layout = {"rank": shard["rank"], "data_parallel_rank": dp_rank}
        for column in id_columns:
            value = rollout_data.get(column)
            shard_layout[column] = list(value) if value is not None else None
        per_sample_columns = {}
        for key, value in rollout_data.items():
            if key in id_columns:
                continue
            if key in _WHOLE_BATCH_FIELDS:
                whole_batch.setdefault(key, value)
            elif key in _LAYOUT_FIELDS or not _is_per_sample(value, num_local):
                shard_layout[key] = value
            else:
                per_sample_columns[key] = value
        for i in range(num_local):
            sample = {"data_parallel_rank": dp_rank}
            for column, scalar_key in id_columns.items():
                values = rollout_data.get(column)
                if values is not None:
                    sample[scalar_key] = values[i]
            for key, column in per_sample_columns.items():
                sample[key] = column[i]
            samples.append(sample)
        layout.append(shard_layout)
    order_key = next((k for k in ("rollout_position", "sample_index")
                      if samples and all(x.get(k) is not None for x in samples)), None)
    if order_key is not None:
        samples.sort(key=lambda x: x[order_key])
    return {"format_version": 2, "rollout_id": rollout_id, "rank": writer_rank, "samples": samples,
            "dp_shards": layout, **whole_batch}


def write_slime_train(template: str, rollout_id: int, dp_shards: list[dict[str, Any]], rank: int = 0) -> Path:
    """``save_debug_train_data``: the payload above, ``torch.save``d to the template."""
    import torch

    path = Path(template.format(rollout_id=rollout_id, rank=rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slime_train_payload(dp_shards, rollout_id=rollout_id, writer_rank=rank), path)
    return path


# ---------------------------------------------------------------------- TRL @f2cd577
def write_trl_completions(output_dir: Path, global_step: int, prompts: list[str], completions: list[str],
                          rewards: dict[str, list[float | None]], advantages: list[float],
                          extra: dict[str, list[Any]] | None = None) -> Path:
    """``GRPOTrainer.log``: ``pd.DataFrame(table).to_parquet(<output_dir>/completions/
    completions_{global_step:05d}.parquet)`` with step, prompt, completion, one column per reward
    function, the log_extra columns, advantage."""
    import pandas as pd

    (output_dir / "completions").mkdir(parents=True, exist_ok=True)
    table = {"step": [global_step] * len(prompts), "prompt": prompts, "completion": completions,
             **rewards, **(extra or {}), "advantage": advantages}
    p = output_dir / "completions" / f"completions_{global_step:05d}.parquet"
    pd.DataFrame(table).to_parquet(p)
    return p


# ---------------------------------------------------------------------- verl @b178a3cd5
def write_verl_dump(dump_path: Path, global_steps: int, inputs: list[str], outputs: list[str], gts: list[Any],
                    scores: list[float], reward_extra_infos_dict: dict[str, list[Any]]) -> Path:
    """verl/trainer/ppo/ray_trainer.py ``RayPPOTrainer._dump_generations``, line for line."""
    dump_path.mkdir(parents=True, exist_ok=True)
    filename = dump_path / f"{global_steps}.jsonl"
    n = len(inputs)
    base_data = {"input": inputs, "output": outputs, "gts": gts, "score": scores, "step": [global_steps] * n}
    for k, v in reward_extra_infos_dict.items():
        if len(v) == n:
            base_data[k] = v
    lines = []
    for i in range(n):
        entry = {k: v[i] for k, v in base_data.items()}
        lines.append(json.dumps(entry, ensure_ascii=False))
    with open(filename, "w") as f:
        f.write("\n".join(lines) + "\n")
    return filename
