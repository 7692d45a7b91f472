"""Plant the four known causes of engine/trainer logprob drift into a real RL job.

One reusable module for the demo job, the attribution tests and ``make demo``. ``Faults`` names
which causes are planted (the ids are the cause names used everywhere: ``logprob_mode``,
``runtime_defaults``, ``weight_sync``, ``lm_head_precision``); the functions below turn it into
what a real job would get wrong:

- ``logprob_mode``: the engine returns *raw* logprobs (vLLM's default) while the trainer computes
  logprobs under the processed (temperature / top-k / top-p) distribution it sampled from.
- ``runtime_defaults``: the checkpoint's ``generation_config.json`` carries sampling defaults
  (``top_k``) that the engine applies silently to a job that starts from
  ``llm.get_default_sampling_params()``; the trainer assumes only the fields the job set.
- ``weight_sync``: after each step the job reloads the *previous* checkpoint directory (a stale
  path), so the engine runs one version behind while the job and trainer believe it is current.
- ``lm_head_precision``: the engine's lm_head runs in bf16 (no ``head_dtype`` override) while the
  trainer's reference keeps the head in fp32.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

CAUSES = ("logprob_mode", "runtime_defaults", "weight_sync", "lm_head_precision")

# Sampling defaults planted in the checkpoint for ``runtime_defaults``. top_k truncates the
# distribution the engine samples from and reports (processed logprobs), which the trainer, who
# never asked for top_k, does not apply. A small k makes the gap clearly larger than bf16 noise.
PLANTED_GENERATION_DEFAULTS: dict[str, Any] = {"top_k": 3}

# Engine args every demo/test engine uses on a CPU box (see docs/vllm-cpu.md).
CPU_ENGINE_ARGS: dict[str, Any] = {
    "dtype": "bfloat16", "gpu_memory_utilization": 0.3, "enforce_eager": True, "max_model_len": 512
}


@dataclass(frozen=True)
class Faults:
    """Which causes to plant. All False = a clean job whose engine matches the trainer's view."""

    logprob_mode: bool = False
    runtime_defaults: bool = False
    weight_sync: bool = False
    lm_head_precision: bool = False

    @classmethod
    def of(cls, *names: str) -> Faults:
        """``Faults.of("weight_sync", "lm_head_precision")``; unknown names raise ValueError."""
        bad = [n for n in names if n not in CAUSES]
        if bad:
            raise ValueError(f"unknown fault(s) {bad}; known: {', '.join(CAUSES)}")
        return cls(**{n: True for n in names})

    @property
    def planted(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)

    def __str__(self) -> str:
        return "+".join(self.planted) or "clean"


def engine_args(faults: Faults, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM engine arguments for a job with ``faults`` planted (on top of ``base``)."""
    args: dict[str, Any] = dict(CPU_ENGINE_ARGS if base is None else base)
    args["logprobs_mode"] = "raw_logprobs" if faults.logprob_mode else "processed_logprobs"
    # "auto" is vLLM's default and reads the checkpoint's generation_config.json; the clean job
    # pins "vllm" so nothing from the file reaches the sampler.
    args["generation_config"] = "auto" if faults.runtime_defaults else "vllm"
    if not faults.lm_head_precision:
        args["hf_overrides"] = {**args.get("hf_overrides", {}), "head_dtype": "float32"}
    elif str(args.get("dtype", "auto")) in ("float32", "float", "torch.float32"):
        # An fp32 engine has an fp32 head already: plant the bf16 head explicitly.
        args["hf_overrides"] = {**args.get("hf_overrides", {}), "head_dtype": "bfloat16"}
    return args


def generation_defaults(faults: Faults) -> dict[str, Any]:
    """Sampling defaults the checkpoint's generation_config.json should carry."""
    return dict(PLANTED_GENERATION_DEFAULTS) if faults.runtime_defaults else {}


# Tiny random models have small logits (|logit| ~ 4), where a bf16 lm_head rounds no worse than
# the bf16 body. Real LLMs have logits in the tens. Adding the same per-position offset to every
# vocab row (a rank-one term on one hidden dimension) keeps each next-token distribution exactly
# while raising logit magnitudes to ~60, where bf16 head rounding (spacing 0.25) is clearly visible.
DEFAULT_LOGIT_OFFSET = 60.0


def prepare_model(
    faults: Faults, model_dir: str | Path, work_dir: str | Path | None = None, *, logit_offset: float = 0.0
) -> Path:
    """The checkpoint the job serves and trains: ``model_dir`` itself, or a cached copy beside it
    (or under ``work_dir`` when that is not writable) with

    - ``logit_offset`` > 0: realistic logit magnitudes (see ``DEFAULT_LOGIT_OFFSET``), and
    - ``runtime_defaults`` planted: ``PLANTED_GENERATION_DEFAULTS`` in generation_config.json.

    Copies persist (replays need the config and tokenizer of the model that was recorded) and are
    shared by every run with the same settings, so clean and faulty runs see the same weights.
    """
    model_dir = Path(model_dir)
    defaults = generation_defaults(faults)
    if not defaults and not logit_offset:
        return model_dir
    # The name encodes every setting, so a cached copy never stands in for different ones.
    tag = (f"+offset{logit_offset:g}" if logit_offset else "") + "".join(f"+{k}{v}" for k, v in sorted(defaults.items()))
    out = _writable_parent(model_dir, work_dir) / f"{model_dir.name}{tag}"
    if out.exists():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    if logit_offset:
        _add_logit_offset(tmp, logit_offset)
    if defaults:
        gen_path = tmp / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        gen.update(defaults)
        gen_path.write_text(json.dumps(gen, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _writable_parent(model_dir: Path, work_dir: str | Path | None) -> Path:
    if os.access(model_dir.parent, os.W_OK) or work_dir is None:
        return model_dir.parent
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(work_dir)


def _add_logit_offset(model_dir: Path, offset: float, dim: int = 0) -> None:
    """lm_head[:, dim] += offset / E|h_dim|: every logit of a position shifts by the same amount."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("tie_word_embeddings"):
        raise ValueError("logit_offset needs an untied lm_head (tie_word_embeddings=false)")
    files = sorted(model_dir.glob("*.safetensors"))
    for f in files:
        sd = load_file(str(f))
        if "lm_head.weight" in sd:
            w = sd["lm_head.weight"]
            w32 = w.float()
            # RMS-normed hidden states have E|h_d| ~ 0.8 (times the final norm's weight on d).
            norm_w = next((v for k, v in sd.items() if k.endswith("norm.weight") and k.count(".") <= 2), None)
            scale = 0.8 * (float(norm_w[dim].abs()) if norm_w is not None else 1.0)
            w32[:, dim] += offset / max(scale, 1e-3)
            sd["lm_head.weight"] = w32.to(w.dtype)
            save_file(sd, str(f), metadata={"format": "pt"})
            return
    raise ValueError(f"no lm_head.weight in {model_dir}")


def reload_dir(faults: Faults, checkpoints: list[Path]) -> Path:
    """The checkpoint directory the job hands to the engine after a step.

    ``checkpoints`` lists the job's checkpoint dirs oldest first (the newest is the version it
    believes is live). With ``weight_sync`` planted it reloads the previous one: the update
    "succeeds" but the engine serves stale weights, one version late.
    """
    if faults.weight_sync and len(checkpoints) >= 2:
        return checkpoints[-2]
    return checkpoints[-1]
