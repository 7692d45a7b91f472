"""A small but real GRPO-style RL job on vLLM, recorded with tracekit.

Each step: a ``Recorder``-wrapped ``vllm.LLM`` samples ``group_size`` completions for each of
``prompts_per_step`` prompts; a verifiable reward scores them (``task.py``); an fp32 Hugging Face
trainer computes its own per-token logprobs under the sampling params it believes the engine used,
logs them to the trace, takes clipped policy-gradient steps, snapshots the new weights and pushes
them into the running engine (in-flight weight sync through ``Recorder.update_weights``).
``Faults`` plants any of the four causes of engine/trainer drift (``tracekit.testing.faults``).

The job's own curves (reward, clip rate, KL(new‖old), entropy, engine/trainer gap) go to
``<trace>/job/metrics.json``; ``tracekit report`` plots them beside the trace's sources.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import amx
from ..testing.faults import DEFAULT_LOGIT_OFFSET, Faults, engine_args, prepare_model, reload_dir
from . import task

amx.enable()  # engines built after this import, and vLLM's spawned workers, get AMX tile state

METRICS_FILE = Path("job") / "metrics.json"
_log = logging.getLogger("tracekit.demo")


@dataclass
class JobResult:
    trace: Path
    faults: Faults
    steps: list[dict[str, Any]] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    recorder_errors: int = 0
    rows_dropped: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    @property
    def metrics_path(self) -> Path:
        return self.trace / METRICS_FILE

    def mean_abs_delta(self) -> float:
        """Token-weighted mean |engine logprob − trainer logprob| over the run (finite tokens)."""
        n = sum(s["delta_tokens"] for s in self.steps)
        return sum(s["engine_trainer_abs_delta"] * s["delta_tokens"] for s in self.steps) / n if n else float("nan")


def run_job(
    out_trace: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    faults: Faults | None = None,
    steps: int = 8,
    group_size: int = 8,
    prompts_per_step: int = 8,
    max_tokens: int = 32,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int | None = None,
    seed: int = 0,
    lr: float = 1.5e-4,
    ppo_epochs: int = 2,
    clip_eps: float = 0.2,
    logit_offset: float = DEFAULT_LOGIT_OFFSET,
    llm: Any = None,
    work_dir: str | os.PathLike[str] | None = None,
    base_engine_args: dict[str, Any] | None = None,
    log: Any = None,
) -> JobResult:
    """Run the toy GRPO job with ``faults`` planted and record it to ``out_trace``.

    ``top_k=None`` leaves top-k unset, like most RL jobs: the engine then uses its default (or,
    with ``runtime_defaults`` planted, the checkpoint's) while the trainer assumes no top-k.
    ``logit_offset``: see ``tracekit.testing.faults.prepare_model`` (0 for a real checkpoint).
    ``llm``: an existing engine built from :func:`engine_spec` (tests share engines); its weights
    and version label are restored when the job ends.
    ``log``: a callable taking one line per step (e.g. ``print``); None is silent.
    """
    from ..capture.recorder import Recorder
    from .trainer import Batch, Trainer

    t_start = time.time()
    faults = faults or Faults()
    out_trace, model_dir = Path(out_trace), Path(model_dir)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="tracekit-job-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    served_model, eargs = engine_spec(faults, model_dir, logit_offset=logit_offset,
                                      base_engine_args=base_engine_args, work_dir=work)
    own_llm = llm is None
    if own_llm:
        from vllm import LLM

        llm = LLM(model=str(served_model), seed=seed, **eargs)
    label_before = _label(llm)
    rec = Recorder(out_trace, snapshot_every=1, initial_weight_version=0,
                   meta={"job": "tracekit.demo.grpo", "faults": faults.planted})
    llm = rec.wrap(llm, engine_args=eargs)
    result = JobResult(out_trace, faults, engine_args=eargs, model=str(served_model))
    trainer = Trainer(served_model, lr=lr, temperature=temperature, top_k=-1 if top_k is None else top_k,
                      top_p=top_p, clip_eps=clip_eps, seed=seed)
    tok = llm.get_tokenizer()
    targets = task.target_token_ids(tok)
    version = 0
    checkpoints: list[Path] = [served_model]
    try:
        _set_label(llm, version)
        rec.log_weights(version, trainer.state_dict(), step=0, force=True)
        result.weight_versions.append(version)
        for step in range(steps):
            t_step = time.time()
            rec.step(step)
            # Like RL jobs do: start from the engine's defaults, set the fields the job cares about.
            sp = llm.get_default_sampling_params()
            sp.temperature, sp.top_p, sp.max_tokens, sp.n = temperature, top_p, max_tokens, group_size
            if top_k is not None:
                sp.top_k = top_k
            sp.logprobs = 0  # the job reads the engine's logprobs to watch its own mismatch
            prompts = task.prompts_for_step(step, prompts_per_step, seed)
            params = []
            for i in range(len(prompts)):
                p = sp.clone()
                p.seed = seed * 1_000_003 + step * 1_000 + i
                params.append(p)
            outs = llm.generate(prompts, params, use_tqdm=False)
            rids, prompt_ids, out_ids, eng_lps, rewards, advs = [], [], [], [], [], []
            for o in outs:
                group_rewards = [task.reward(list(c.token_ids), targets) for c in o.outputs]
                advs.extend(task.group_advantages(group_rewards))
                rewards.extend(group_rewards)
                for c in o.outputs:
                    rids.append(getattr(c, "tracekit_request_id", None))
                    prompt_ids.append(list(o.prompt_token_ids))
                    out_ids.append(list(c.token_ids))
                    eng_lps.append(_engine_logprobs(c))
            for rid, r in zip(rids, rewards):
                if rid is not None:
                    rec.log_reward(rid, r, step=step)
            batch = Batch.build(prompt_ids, out_ids, trainer.pad_id)
            old, ents = trainer.score(batch)
            for rid, lp, ent in zip(rids, old, ents):
                if rid is not None:  # None only if the recorder failed: the job goes on
                    rec.log_trainer_logprobs(rid, lp, step=step, policy_version=version, entropy=ent)
            upd = trainer.update(batch, old, advs, ppo_epochs)
            # New policy version: snapshot what the trainer holds, then push it into the engine.
            version += 1
            # Saved in the engine's dtype (what it would cast to anyway); the snapshot keeps fp32.
            ckpt = trainer.save(work / f"ckpt-v{version}", like=served_model, dtype=_engine_dtype(llm, eargs))
            checkpoints.append(ckpt)
            rec.log_weights(version, trainer.state_dict(), step=step, force=True)
            rec.update_weights(llm, version, str(reload_dir(faults, checkpoints)), step=step, snapshot=False)
            result.weight_versions.append(version)
            d = np.concatenate([e - t for e, t in zip(eng_lps, old)]) if eng_lps else np.zeros(0)
            fin = d[np.isfinite(d)]
            ntok = int(sum(len(o) for o in out_ids))
            row = {
                "step": step, "policy_version": version - 1, "reward": float(np.mean(rewards)) if rewards else 0.0,
                "clip_rate": upd["clip_rate"], "kl_new_old": upd["kl_new_old"],
                "entropy": float(np.mean(np.concatenate(ents))) if ntok else None,
                "engine_trainer_abs_delta": float(np.abs(fin).mean()) if fin.size else float("nan"),
                "delta_tokens": int(fin.size), "nonfinite_tokens": int(d.size - fin.size),
                "requests": len(rids), "tokens": ntok, "seconds": round(time.time() - t_step, 3),
            }
            result.steps.append(row)
            result.requests += len(rids)
            result.tokens += ntok
            if log:
                log(f"step {step}: reward {row['reward']:.3f} clip {row['clip_rate']:.3f} "
                    f"kl {row['kl_new_old']:.4f} entropy {row['entropy']:.3f} "
                    f"|engine-trainer| {row['engine_trainer_abs_delta']:.4f}")
    finally:
        if not own_llm:  # give the shared engine back as it came: original weights and label
            _restore(llm, served_model, label_before)
        _unwrap(llm, rec)
        st = rec.close()
        result.rows_dropped = st.dropped
        result.recorder_errors = rec.errors
        result.seconds = time.time() - t_start
        _write_metrics(result, {"steps": steps, "group_size": group_size, "prompts_per_step": prompts_per_step,
                                    "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                                    "seed": seed, "lr": lr, "ppo_epochs": ppo_epochs, "clip_eps": clip_eps})
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        if own_llm:
            _shutdown(llm)
    return result


def engine_spec(
    faults: Faults, model_dir: str | os.PathLike[str], *, logit_offset: float = DEFAULT_LOGIT_OFFSET,
    base_engine_args: dict[str, Any] | None = None, work_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """(model path, engine args) of the engine ``run_job`` builds for ``faults``:
    ``vllm.LLM(model=str(path), **args)`` gives an engine that can be passed as ``llm=``."""
    return (prepare_model(faults, model_dir, work_dir, logit_offset=logit_offset),
            engine_args(faults, base_engine_args))


def _engine_logprobs(c: Any) -> np.ndarray:
    out = []
    for lp, t in zip(c.logprobs or [], c.token_ids):
        v = lp.get(t) if hasattr(lp, "get") else None
        out.append(v.logprob if v is not None else float("nan"))
    return np.asarray(out, dtype=np.float32)


def _engine_dtype(llm: Any, eargs: dict[str, Any]) -> str:
    try:
        return str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
    except AttributeError:
        return str(eargs.get("dtype", "float32")) if eargs.get("dtype") not in (None, "auto") else "float32"


def _label(llm: Any) -> str | None:
    try:
        return llm.llm_engine.get_weight_version()
    except AttributeError:  # engines without version labels
        return None


def _set_label(llm: Any, version: int) -> None:
    with contextlib.suppress(AttributeError):  # engines without labels: the recorder falls back
        llm.llm_engine.set_weight_version(str(version))


def _restore(llm: Any, model: Path, label: str | None) -> None:
    try:
        hooks = getattr(llm, "_tracekit_hooks", None)
        rpc = hooks.orig_rpc if hooks is not None else llm.collective_rpc
        rpc("reload_weights", kwargs={"weights_path": str(model)})
        llm.reset_prefix_cache()
        if label is not None:
            llm.llm_engine.set_weight_version(label)
    except Exception as e:  # noqa: BLE001 - a failed restore must not hide the job's result
        _log.warning("tracekit demo: could not restore the shared engine: %s", e)


def _unwrap(llm: Any, rec: Any) -> None:
    """Undo ``rec.wrap`` so a shared engine does not keep recording into a closed trace."""
    unwrap = getattr(rec, "unwrap", None)
    if callable(unwrap):
        unwrap(llm)
        return
    hooks = getattr(llm, "_tracekit_hooks", None)
    if hooks is None or getattr(llm, "_tracekit_recorder", None) is not rec:
        return
    for name, orig in (("generate", hooks.orig_generate), ("chat", hooks.orig_chat),
                       ("collective_rpc", hooks.orig_rpc)):
        if getattr(orig, "__self__", None) is llm and getattr(orig, "__func__", None) is getattr(type(llm), name, None):
            llm.__dict__.pop(name, None)  # back to the class method
        else:
            setattr(llm, name, orig)  # another recorder's wrap underneath
    for attr in ("_tracekit_hooks", "_tracekit_recorder"):
        llm.__dict__.pop(attr, None)


def _write_metrics(result: JobResult, params: dict[str, Any]) -> None:
    try:
        p = result.metrics_path
        p.parent.mkdir(parents=True, exist_ok=True)
        doc = {"job": "tracekit.demo.grpo", "faults": result.faults.as_dict(), "params": params,
                   "engine_args": result.engine_args, "model": result.model, "seconds": result.seconds,
                   "weight_versions": result.weight_versions, "steps": result.steps}
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, p)
    except OSError:
        pass


def _shutdown(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # noqa: BLE001 - shutting down is best effort
        _log.debug("engine shutdown: %s", e)


__all__ = ["Faults", "JobResult", "run_job"]
