"""Recorder overhead: the same generate workload with and without the recorder, interleaved in one
run after warm-up, on a real in-process vLLM engine with the tiny model. Prints the wall-time ratio.

    .venv/bin/python bench/record_overhead.py [--prompts 64] [--tokens 128] [--rounds 8] [--breakdown]

``--breakdown`` also times the vLLM functions the logprob touches, per arm, in situ (wall-clock
wrappers on the in-process engine's classes), to say where the logprob's cost goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tracekit import amx

amx.enable()  # AMX hosts: this process and vLLM's spawned workers ask for tile state


def _thread_clock(thread: object) -> int | None:
    try:
        return time.pthread_getcpuclockid(thread.ident)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not every platform has per-thread clocks
        return None


# (module, class, attribute): the engine-step pieces whose work grows when a request wants logprobs,
# and the forward pass as a control (same work in every arm: its spread is the noise floor).
_PIECES = (
    ("vllm.v1.sample.sampler", "Sampler", "compute_logprobs"),  # log_softmax over the batch
    ("vllm.v1.sample.sampler", "Sampler", "gather_logprobs"),  # top-k, gather, rank
    ("vllm.v1.sample.sampler", "Sampler", "forward"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"),  # per-request slices
    ("vllm.v1.engine.output_processor", "OutputProcessor", "process_outputs"),  # front end
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model"),  # forward pass
)
# Disjoint pieces whose deltas add up to the logprob's cost (the two above run inside forward).
_ATTRIBUTABLE = ("Sampler.forward", "Scheduler.update_from_output", "OutputProcessor.process_outputs")


def _time_pieces(acc: dict[tuple[str, str], float], cur: list[str | None]) -> list[str]:
    """Wrap each piece with a perf_counter accumulator keyed by (current arm, piece)."""
    import importlib

    done = []
    for mod, cls_name, attr in _PIECES:
        try:
            cls = getattr(importlib.import_module(mod), cls_name)
            raw = cls.__dict__[attr]
        except (ImportError, AttributeError, KeyError):
            continue  # another vLLM layout: time what exists
        static = isinstance(raw, staticmethod)
        fn = raw.__func__ if static else raw
        name = f"{cls_name}.{attr}"

        def timed(*a: object, _fn=fn, _name=name, **kw: object) -> object:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                acc[(cur[0] or "-", _name)] = acc.get((cur[0] or "-", _name), 0.0) + time.perf_counter() - t0

        setattr(cls, attr, staticmethod(timed) if static else timed)
        done.append(name)
    return done


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--model", help="Model dir (default: build the tiny Qwen2)")
    ap.add_argument("--no-fast-logprobs", action="store_true",
                    help="A/B: disable the recorder's fast path for the logprobs it adds (tracekit.capture.fastlp)")
    ap.add_argument("--breakdown", action="store_true",
                    help="time vLLM's sampler/scheduler/front-end pieces per arm (in-process engine)")
    a = ap.parse_args()

    from vllm import LLM, SamplingParams

    import tracekit
    from tracekit.testing.tiny_model import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="tk-bench-"))
    model = a.model or str(build_tiny_model(tmp / "tiny", arch="qwen2", seed=0))
    llm = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0, max_model_len=512)
    prompts = [f"the quick brown fox {i} jumps over" for i in range(a.prompts)]
    sp = SamplingParams(temperature=1.0, max_tokens=a.tokens, min_tokens=a.tokens, seed=None)
    plain = llm.generate
    if a.no_fast_logprobs:
        from tracekit.capture import fastlp

        fastlp._state["installed"] = False
    from tracekit.capture.llm import prepare_params

    # Exactly the params the recorder sends (logprobs=0, flat, fast front-end marker), without the
    # recorder: this arm is vLLM's cost of the sampled-token logprob; recorded vs it, ours.
    sp_lp = prepare_params(sp, defaults_applied=False).send
    rec = tracekit.Recorder(tmp / "trace")
    rec.wrap(llm)
    recorded = llm.generate
    for fn in (plain, recorded, plain, recorded):  # warm-up (first logprobs call is slow)
        t0 = time.perf_counter()
        fn(prompts, sp, use_tqdm=False)
        print(f"warm-up {time.perf_counter() - t0:.3f} s", file=sys.stderr, flush=True)
    t_plain, t_rec, c_plain, c_rec, t_lp, c_lp = [], [], [], [], [], []
    m_cpu: dict[str, float] = {"plain": 0.0, "lp": 0.0, "rec": 0.0}  # main thread only (no OpenMP workers)
    gc_s: dict[str, float] = {"plain": 0.0, "lp": 0.0, "rec": 0.0}  # cyclic GC pauses (main thread)
    gc_t0 = [0.0]

    def _gc_cb(phase: str, info: dict) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        elif cur[0] is not None:
            gc_s[cur[0]] += time.perf_counter() - gc_t0[0]

    cur: list[str | None] = [None]
    pieces: dict[tuple[str, str], float] = {}
    timed = _time_pieces(pieces, cur) if a.breakdown else []
    import gc

    gc.callbacks.append(_gc_cb)
    wclock = _thread_clock(rec.writer._thread)
    w0 = time.clock_gettime(wclock) if wclock is not None else None
    for r in range(a.rounds):
        order = [(plain, sp, t_plain, c_plain, "plain"), (plain, sp_lp, t_lp, c_lp, "lp"), (recorded, sp, t_rec, c_rec, "rec")]
        if r % 2:
            order.reverse()
        for fn, params, acc, cacc, name in order:
            c0, t0, m0 = time.process_time(), time.perf_counter(), time.thread_time()
            cur[0] = name
            fn(prompts, params, use_tqdm=False)
            cur[0] = None
            acc.append(time.perf_counter() - t0)
            cacc.append(time.process_time() - c0)  # all threads of this process, writer included
            m_cpu[name] += time.thread_time() - m0
        print(f"round {r}: plain {t_plain[-1]:.3f} s, logprobs=0 {t_lp[-1]:.3f} s, recorded {t_rec[-1]:.3f} s",
              file=sys.stderr, flush=True)
    rec.flush()
    w_cpu = time.clock_gettime(wclock) - w0 if wclock is not None else float("nan")
    st = rec.close()
    toks = a.prompts * a.tokens
    ratio = sum(t_rec) / sum(t_plain)
    med = statistics.median(t_rec) / statistics.median(t_plain)
    print(f"workload: {a.prompts} prompts x {a.tokens} tokens, {a.rounds} interleaved rounds, vLLM {tracekit.capture.fingerprint.vllm_version()}")
    print(f"plain    : total {sum(t_plain):.2f} s  median {statistics.median(t_plain):.3f} s/round  ({toks / statistics.median(t_plain):,.0f} tok/s)")
    print(f"recorded : total {sum(t_rec):.2f} s  median {statistics.median(t_rec):.3f} s/round")
    # Each round runs the arms back to back, so a per-round ratio cancels slow drifts of the box;
    # its median is the least noisy single figure (single rounds still vary by a few %).
    paired = statistics.median(r / p for r, p in zip(t_rec, t_plain))
    print(f"overhead : {100 * (ratio - 1):+.2f} % wall time (total ratio {ratio:.4f}, median ratio {med:.4f}, "
          f"median of per-round ratios {paired:.4f})")
    cratio = sum(c_rec) / sum(c_plain)
    print(f"cpu time : plain {sum(c_plain):.2f} s, recorded {sum(c_rec):.2f} s -> {100 * (cratio - 1):+.2f} % "
          "(process CPU time, less sensitive to other load on the box)")
    lratio = sum(t_lp) / sum(t_plain)
    lcratio = sum(c_lp) / sum(c_plain)
    print(f"of which : the params the recorder sends, no recorder (vLLM computing the logprob): {100 * (lratio - 1):+.2f} % wall, "
          f"{100 * (lcratio - 1):+.2f} % CPU; recorder itself vs logprobs=0: "
          f"{100 * (sum(t_rec) / sum(t_lp) - 1):+.2f} % wall, {100 * (sum(c_rec) / sum(c_lp) - 1):+.2f} % CPU")
    print(f"main thread CPU (engine loop + hooks, no OpenMP workers): plain {m_cpu['plain']:.2f} s, logprobs=0 "
          f"{m_cpu['lp']:.2f} s ({100 * (m_cpu['lp'] / m_cpu['plain'] - 1):+.2f} %), recorded {m_cpu['rec']:.2f} s "
          f"({100 * (m_cpu['rec'] / m_cpu['lp'] - 1):+.2f} % vs logprobs=0); writer thread {w_cpu:.2f} s "
          f"= {100 * w_cpu / sum(c_plain):.2f} % of plain CPU")
    print(f"GC pauses: plain {gc_s['plain']:.2f} s, logprobs=0 {gc_s['lp']:.2f} s, recorded {gc_s['rec']:.2f} s")
    if timed:
        base = sum(t_plain)
        print("breakdown (s over all rounds; delta = that arm minus plain, as % of plain wall time):")
        for name in timed:
            p, lp, r = (pieces.get((arm, name), 0.0) for arm in ("plain", "lp", "rec"))
            print(f"  {name:36s} plain {p:7.3f}  logprobs=0 {lp:7.3f} ({100 * (lp - p) / base:+.2f} %)  "
                  f"recorded {r:7.3f} ({100 * (r - p) / base:+.2f} %)")
        if all(n in timed for n in _ATTRIBUTABLE):
            # Less noisy than whole-run wall time: the forward pass, identical in all arms, is left out.
            d_lp, d_rec = (sum(pieces.get((arm, n), 0.0) - pieces.get(("plain", n), 0.0) for n in _ATTRIBUTABLE)
                           for arm in ("lp", "rec"))
            print(f"  attributable to the logprob (sampler + scheduler + front end, forward pass excluded): "
                  f"logprobs=0 {100 * d_lp / base:+.2f} %, recorded {100 * d_rec / base:+.2f} % of plain wall "
                  "(the recorder's own hooks are outside these pieces)")
    print(f"trace    : {st.rows_written.get('tokens', 0):,} tokens written, {st.dropped} rows dropped")
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
