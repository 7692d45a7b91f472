"""The toy job's trainer: an fp32 Hugging Face copy of the policy (the "trainer view").

It scores the sampled tokens under the processed distribution it believes the engine sampled from
(the SAME math as ``tracekit.replay.processed``, which also builds the mask used by the
differentiable loss), and takes clipped policy-gradient (PPO/GRPO) steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..replay.processed import entropy as raw_entropy
from ..replay.processed import processed_distribution, processed_logprobs
from ..replay.reference import load_reference_model


@dataclass
class Batch:
    """Sampled sequences, right-padded: ``ids[b]`` = prompt + completion."""

    ids: Any  # LongTensor [B, L]
    attn: Any  # LongTensor [B, L]
    prompt_lens: list[int]
    out_lens: list[int]

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], pad_id: int) -> Batch:
        import torch

        seqs = [list(p) + list(o) for p, o in zip(prompts, outputs)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s)
            attn[i, : len(s)] = 1
        return cls(ids, attn, [len(p) for p in prompts], [len(o) for o in outputs])

    def completion_rows(self, logits: Any, b: int) -> Any:
        """Rows of ``logits[b]`` that predict the completion tokens of sequence ``b``."""
        p, n = self.prompt_lens[b], self.out_lens[b]
        return logits[b, p - 1 : p - 1 + n]

    def completion_ids(self, b: int) -> Any:
        p, n = self.prompt_lens[b], self.out_lens[b]
        return self.ids[b, p : p + n]


class Trainer:
    """fp32 policy with an fp32 head, an Adam optimizer, and the sampling params it assumes."""

    def __init__(self, model_dir: str | Path, *, lr: float, temperature: float, top_k: int, top_p: float,
                 clip_eps: float = 0.2, seed: int = 0) -> None:
        import torch

        torch.manual_seed(seed)
        self.model = load_reference_model(model_dir, dtype="float32")
        self.model.train(False)  # no dropout: the trainer's logprobs must be deterministic
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.clip_eps = clip_eps
        self.pad_id = int(self.model.config.pad_token_id or 0)

    def logits(self, batch: Batch, grad: bool = False) -> Any:
        import torch

        with torch.set_grad_enabled(grad):
            return self.model(input_ids=batch.ids, attention_mask=batch.attn).logits.float()

    def score(self, batch: Batch) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per sequence: processed logprobs of its completion tokens and raw entropies."""
        logits = self.logits(batch)
        lps, ents = [], []
        for b in range(len(batch.out_lens)):
            rows = batch.completion_rows(logits, b)
            lps.append(processed_logprobs(rows, batch.completion_ids(b).numpy(), **self.sampling).astype(np.float32))
            ents.append(raw_entropy(rows).astype(np.float32))
        return lps, ents

    def _new_logprobs(self, logits: Any, batch: Batch) -> list[Any]:
        """Differentiable processed logprobs: the filter mask comes from the shared math."""
        import torch

        out = []
        t = self.sampling["temperature"]
        for b in range(len(batch.out_lens)):
            rows = batch.completion_rows(logits, b)
            with torch.no_grad():
                keep = torch.isfinite(processed_distribution(rows, **self.sampling))
            scaled = rows / t if t >= 1e-5 else rows
            lp = scaled.masked_fill(~keep, float("-inf")).log_softmax(dim=-1)
            out.append(lp.gather(1, batch.completion_ids(b).view(-1, 1)).view(-1))
        return out

    def update(self, batch: Batch, old: list[np.ndarray], advantages: Sequence[float], epochs: int) -> dict[str, float]:
        """``epochs`` full-batch clipped policy-gradient steps against ``old`` logprobs.

        Returns the job's own curves: clip rate (share of tokens whose ratio left [1-ε, 1+ε] in
        the steps after the first), and KL(new‖old) after the update, estimated on the sampled
        tokens as mean(r·log r − r + 1), r = exp(new − old) (non-negative, unbiased for samples
        drawn from old).
        """
        import torch

        old_t = [torch.as_tensor(o) for o in old]
        adv = torch.as_tensor(list(advantages), dtype=torch.float32)
        clipped = total = 0
        for epoch in range(epochs):
            new = self._new_logprobs(self.logits(batch, grad=True), batch)
            losses = []
            for b, (n_lp, o_lp) in enumerate(zip(new, old_t)):
                if n_lp.numel() == 0:
                    continue
                finite = torch.isfinite(o_lp) & torch.isfinite(n_lp)
                ratio = torch.exp(torch.where(finite, n_lp - o_lp, torch.zeros_like(n_lp)))
                unclipped = ratio * adv[b]
                clip = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * adv[b]
                losses.append(-torch.minimum(unclipped, clip)[finite].sum())
                if epoch > 0:
                    clipped += int(((ratio - 1).abs() > self.clip_eps)[finite].sum())
                    total += int(finite.sum())
            ntok = max(1, sum(batch.out_lens))
            loss = torch.stack(losses).sum() / ntok if losses else None
            self.opt.zero_grad(set_to_none=True)
            if loss is not None and loss.requires_grad:
                loss.backward()
                self.opt.step()
        after, _ = self.score(batch)
        with np.errstate(invalid="ignore"):  # -inf - -inf where both filtered the token out
            r_log = [np.where(np.isfinite(a) & np.isfinite(o), a - o, 0.0) for a, o in zip(after, old)]
        d = np.concatenate(r_log) if r_log else np.zeros(0)
        r = np.exp(d)
        kl = float(np.mean(r * d - r + 1)) if d.size else 0.0
        return {"clip_rate": clipped / total if total else 0.0, "kl_new_old": kl}

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def save(self, out_dir: Path, like: Path, dtype: str) -> Path:
        """Write the current weights as a checkpoint directory vLLM can reload.

        config/tokenizer/generation_config files are copied from ``like``: an in-process engine
        re-reads generation defaults from the directory it last reloaded.
        """
        import shutil

        import torch
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        for f in Path(like).iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, out_dir / f.name)
        sd = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in self.state_dict().items()}
        if getattr(self.model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return out_dir
