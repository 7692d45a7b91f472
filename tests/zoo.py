"""The fault zoo's job: a small GRPO-style loop written the way RL stacks write it, not the way
tracekit's demo does. It is the test bed for `attribute` on jobs it was not built around.

What differs from the demo job (tracekit/demo/job.py):
- weights are pushed by the JOB: ``llm.collective_rpc("reload_weights", ...)`` (+ optionally
  ``reset_prefix_cache``) and the version it believes is live is told afterwards with
  ``rec.log_weights(v, dir)``; or no statement at all (zero-code);
- sampling params come from explicit ``SamplingParams`` or from ``llm.get_default_sampling_params()``
  with a few fields set;
- the trainer is a plain fp32 Hugging Face forward that scores each sample under the params the job
  asked for, with the policy version it believes; no learning (versions are random perturbations);
- surfaces: ``generate`` with n>1, GRPO n=1 repeated prompts, ``chat``, AsyncLLM with a push in the
  middle of streams, and ``tracekit record --`` (run this file as a script).

Each ``Run`` names exactly the causes it plants (ids of tracekit.causes).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Sampling defaults a model file ships (generation_config.json), by name. top_k 20 barely truncates
# a T=0.7 distribution of this model (0.0004 nats): "k3" is one that bites at any temperature.
FILE_DEFAULTS: dict[str, dict[str, Any]] = {"": {}, "t05k20": {"temperature": 0.5, "top_k": 20}, "k3": {"top_k": 3}}
SYSTEM = ("You are a careful assistant. Think step by step, check every number twice, and answer with "
          "one short line. The quick brown fox jumps over the lazy dog near the river bank today. ")
PROMPTS = ["the quick brown", "a lazy dog sat", "numbers: one two", "hello world and"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
CPU_ARGS: dict[str, Any] = {"dtype": "bfloat16", "gpu_memory_utilization": 0.3, "enforce_eager": True,
                            "max_model_len": 512, "block_size": 32, "seed": 0}


@dataclass(frozen=True)
class Run:
    name: str
    planted: tuple[str, ...]
    mode: str = "processed_logprobs"  # engine logprobs_mode
    head: str = "float32"  # engine lm_head dtype
    gen_config: str = "vllm"  # "auto" applies the model file's sampling defaults
    file_defaults: str = ""  # the served model ships FILE_DEFAULTS[file_defaults]
    params: str = "explicit"  # or "defaults": start from llm.get_default_sampling_params()
    temperature: float = 1.0  # what the job asks for and the trainer scores under
    push: str = "rpc"  # rpc | stale | skip | no_reset | update_weights (rec.update_weights)
    surface: str = "generate"  # generate | n1 | chat | async | zero_code
    system_prefix: bool = False
    steps: int = 3
    n: int = 4
    max_tokens: int = 16

    def engine_key(self) -> tuple:
        return (self.mode, self.head, self.gen_config, self.file_defaults)

    def engine_args(self) -> dict[str, Any]:
        args = dict(CPU_ARGS, logprobs_mode=self.mode, generation_config=self.gen_config)
        args["hf_overrides"] = {"head_dtype": self.head}
        return args


ZOO = [
    Run("clean", ()),
    Run("clean_update_weights", (), push="update_weights"),
    Run("stale_push", ("weight_sync",), push="stale"),
    Run("skipped_push", ("weight_sync",), push="skip"),
    Run("no_prefix_reset", ("weight_sync",), push="no_reset", system_prefix=True),
    Run("file_defaults", ("runtime_defaults",), gen_config="auto", file_defaults="t05k20",
        params="defaults"),
    Run("cancelling_pair", ("runtime_defaults",), mode="raw_logprobs", gen_config="auto", file_defaults="t05k20",
        params="defaults"),
    Run("raw_at_t07", ("logprob_mode",), mode="raw_logprobs", temperature=0.7),
    Run("bf16_head", ("lm_head_precision",), head="bfloat16"),
    Run("stale_and_bf16_head", ("lm_head_precision", "weight_sync"), head="bfloat16", push="stale"),
    Run("raw_and_file_topk", ("logprob_mode", "runtime_defaults"), mode="raw_logprobs", gen_config="auto",
        file_defaults="k3", params="defaults", temperature=0.7),
    Run("grpo_n1_raw", ("logprob_mode",), mode="raw_logprobs", temperature=0.7, surface="n1"),
    Run("chat_bf16_head", ("lm_head_precision",), head="bfloat16", surface="chat"),
    Run("async_mid_stream", ("weight_sync",), surface="async"),
    Run("zero_code_raw", ("logprob_mode",), mode="raw_logprobs", temperature=0.7, surface="zero_code"),
]


# ---------------------------------------------------------------------- models and versions
def make_versions(base: Path, out: Path, n: int, *, file_defaults: str = "", seed: int = 0) -> list[Path]:
    """``n`` checkpoint dirs (v0 = ``base``'s weights): each version perturbs every non-norm,
    non-head tensor by 0.03 × its std, like a trainer step. Saved in bf16 with the config,
    tokenizer and generation_config beside (vLLM re-reads them from the reload path)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (out / f"v{n - 1}" / "model.safetensors").exists():
        return [out / f"v{k}" for k in range(n)]
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for k in range(n):
        d = out / f"v{k}"
        d.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors"):
                shutil.copy2(f, d / f.name)
        if file_defaults:
            gen = json.loads((d / "generation_config.json").read_text())
            gen.update(FILE_DEFAULTS[file_defaults])
            (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if k:
            for name, w in sd.items():
                if "norm" in name or "lm_head" in name or w.ndim < 2:
                    continue
                w32 = w.float()
                sd[name] = (w32 + 0.03 * w32.std() * torch.randn(w32.shape, generator=g)).to(w.dtype)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs


class Trainer:
    """fp32 scoring of sampled tokens under the params the job asked for (what the loss uses)."""

    def __init__(self, dirs: list[Path]) -> None:
        from tracekit.replay.reference import load_reference_model

        self.dirs = dirs
        self.model = load_reference_model(dirs[0], dtype="float32")
        self.version = 0

    def use(self, version: int) -> None:
        from safetensors.torch import load_file

        from tracekit.replay.reference import load_weights

        if version != self.version:
            load_weights(self.model, load_file(str(self.dirs[version] / "model.safetensors")))
            self.version = version

    def score(self, prompt: list[int], output: list[int], temperature: float) -> np.ndarray:
        from tracekit.replay.processed import processed_logprobs
        from tracekit.replay.reference import reference_logits

        logits = reference_logits(self.model, prompt + output)[len(prompt) - 1: len(prompt) - 1 + len(output)]
        return processed_logprobs(logits, output, temperature=temperature).astype(np.float32)


# ---------------------------------------------------------------------- the job
def params_for(llm: Any, run: Run, seed: int) -> Any:
    from vllm import SamplingParams

    if run.params == "defaults":  # like many RL stacks: the engine's defaults + the job's fields
        sp = llm.get_default_sampling_params()
        sp.n, sp.max_tokens, sp.seed = (1 if run.surface == "n1" else run.n), run.max_tokens, seed
        if run.temperature != 1.0:
            sp.temperature = run.temperature
        return sp
    return SamplingParams(n=1 if run.surface == "n1" else run.n, temperature=run.temperature,
                          max_tokens=run.max_tokens, seed=seed)


def push(llm: Any, rec: Any, run: Run, dirs: list[Path], v: int, step: int) -> None:
    """The job makes version ``v`` live (or believes it did) and tells the recorder."""
    if run.push == "update_weights":
        rec.update_weights(llm, v, str(dirs[v]), step=step, snapshot=True)
        return
    if run.push != "skip":
        src = dirs[v - 1] if run.push == "stale" else dirs[v]
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(src)})
        if run.push != "no_reset":
            llm.reset_prefix_cache()
    if rec is not None:
        rec.log_weights(v, str(dirs[v]), step=step)


def run_sync(llm: Any, rec: Any, run: Run, dirs: list[Path], trainer: Trainer) -> None:
    """The offline loop: sample, score, push; ``rec`` is None for zero-code (the job never names
    a version: it only reloads)."""
    from tracekit.capture.launch import current_recorder

    rec_api = rec or current_recorder()
    if rec is not None:
        rec.log_weights(0, str(dirs[0]), step=0)
    version = 0
    for step in range(run.steps):
        rec_api.step(step)
        prefix = SYSTEM if run.system_prefix else ""
        texts = [prefix + p for p in PROMPTS]
        if run.surface == "n1":
            texts = [t for t in texts for _ in range(run.n)]
            params = [params_for(llm, run, 1000 * step + i) for i in range(len(texts))]
        else:
            params = [params_for(llm, run, 1000 * step + i) for i in range(len(texts))]
        if run.surface == "chat":
            outs = llm.chat([[{"role": "user", "content": t}] for t in texts], params, use_tqdm=False,
                            chat_template=CHAT_TEMPLATE)
        else:
            outs = llm.generate(texts, params, use_tqdm=False)
        trainer.use(version)
        for o in outs:
            for c in o.outputs:
                rid = getattr(c, "tracekit_request_id", None)
                lps = trainer.score(list(o.prompt_token_ids), list(c.token_ids), run.temperature)
                if rid is not None:
                    rec_api.log_trainer_logprobs(rid, lps, step=step,
                                                 policy_version=None if rec is None else version)
        if step + 1 < run.steps:
            version += 1
            push(llm, rec, run, dirs, version, step)


async def run_async(engine: Any, rec: Any, run: Run, dirs: list[Path], trainer: Trainer) -> None:
    """AsyncLLM: 8 long streams; after ~8 tokens the job pushes v1 with collective_rpc (no label),
    resets the prefix cache and says v1 is live; 4 more requests follow. The trainer scores every
    sample under the version that was live when it was submitted (what it believes)."""
    from vllm import SamplingParams

    rec.log_weights(0, str(dirs[0]), step=0)
    rec.step(0)
    sp = SamplingParams(n=1, temperature=1.0, max_tokens=48, min_tokens=48, seed=1)
    got: dict[str, tuple[list[int], Any, int]] = {}
    progressed = asyncio.Event()

    async def one(rid: str, text: str, version: int) -> None:
        last = None
        async for out in engine.generate(text, sp, rid):
            last = out
            if len(out.outputs[0].token_ids) >= 8:
                progressed.set()
        got[rid] = (list(last.prompt_token_ids), last.outputs[0], version)

    first = [asyncio.create_task(one(f"a{i}", PROMPTS[i % 4] + f" {i}", 0)) for i in range(8)]
    await progressed.wait()
    await engine.collective_rpc("reload_weights", kwargs={"weights_path": str(dirs[1])})
    await engine.reset_prefix_cache()
    rec.log_weights(1, str(dirs[1]), step=0)
    rec.step(1)
    later = [asyncio.create_task(one(f"b{i}", PROMPTS[i % 4] + f" again {i}", 1)) for i in range(4)]
    await asyncio.gather(*first, *later)
    for _rid, (prompt, comp, version) in sorted(got.items()):
        trainer.use(version)
        rid = getattr(comp, "tracekit_request_id", None)
        if rid is not None:
            rec.log_trainer_logprobs(rid, trainer.score(prompt, list(comp.token_ids), 1.0), step=version,
                                     policy_version=version)


def restore(llm: Any, dirs: list[Path]) -> None:
    """Give a pooled engine back with v0's weights, an empty prefix cache and its label reset."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(dirs[0])})
    llm.reset_prefix_cache()
    try:
        llm.llm_engine.set_weight_version("0")
    except Exception:  # noqa: BLE001 - older engines without labels
        pass


def main(argv: list[str]) -> None:
    """Zero-code entry: ``tracekit record --out T -- python zoo.py RUN_JSON DIRS_JSON MODEL``."""
    from vllm import LLM

    run = Run(**{k: tuple(v) if k == "planted" else v for k, v in json.loads(argv[0]).items()})
    dirs = [Path(p) for p in json.loads(argv[1])]
    llm = LLM(model=str(dirs[0]), **run.engine_args())
    run_sync(llm, None, run, dirs, Trainer(dirs))


def run_json(run: Run) -> str:
    return json.dumps(asdict(run))


if __name__ == "__main__":
    main(sys.argv[1:])
