"""Disk faults: an unwritable directory, a full disk, a very slow disk.

In every case the recorded job finishes with the same outputs as without recording faults,
the writer accounts for every row (written + dropped + pending = submitted) and reports the
drops (``close()`` stats, the run's 'close' row, ``tracekit info``), and parts already on disk
stay byte-identical and valid. The writer-level cases run a deterministic "job" in a child
process (so RLIMIT_FSIZE and monkeypatched slowness stay there); the engine cases record a
real vLLM engine through the Recorder onto a tmpfs that fills up or turns read-only (root only:
they need ``mount``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracekit.store import Trace, TraceWriter
from tracekit.store.info import info
from tracekit.store.validate import validate

JOB = textwrap.dedent(
    r"""
    import hashlib, json, os, resource, signal, sys, time
    import numpy as np

    root, mode = sys.argv[1], sys.argv[2]
    if mode == "fsize":  # a "full disk": no file may grow past 64 KiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    slept = [0.0]
    if mode == "slow":  # every part takes 1 s to write: the disk is far slower than the job
        import tracekit.store.writer as wmod
        real = wmod.write_part_atomic
        def slow(*a, **k):
            time.sleep(1.0)
            slept[0] += 1.0
            return real(*a, **k)
        wmod.write_part_atomic = slow
    from tracekit.store import TraceWriter
    w = TraceWriter(root, flush_interval=0.1, max_queue_rows=30000 if mode == "slow" else 8 << 20)
    rng = np.random.default_rng(0)
    digest, in_write, submitted = hashlib.sha256(), 0.0, {}
    snap = {}
    for step in range(12):
        n_tok = 20000 if step % 3 == 2 else 300  # every third step is too big for a 64 KiB file
        for r in range(4):
            rid = step * 100 + r
            toks = rng.integers(0, 50000, n_tok).astype(np.int32)
            lps = -rng.random(n_tok).astype(np.float32)
            digest.update(toks.tobytes() + lps.tobytes())  # the job's "output"
            t0 = time.perf_counter()
            w.write("requests", {"request_id": rid, "run_id": w.run_id, "step": step, "output_token_ids": toks.tolist()})
            w.write_columns("tokens", {"pos": np.arange(n_tok, dtype=np.int32), "token_id": toks, "logprob": lps},
                            request_id=rid)
            in_write += time.perf_counter() - t0
            submitted["requests"] = submitted.get("requests", 0) + 1
            submitted["tokens"] = submitted.get("tokens", 0) + n_tok
        if mode != "slow":
            w.flush()
        if step == 4:  # what is on disk now must survive the faults that follow untouched
            snap = {str(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
                    for p in __import__("pathlib").Path(root).rglob("*.parquet")}
    t0 = time.perf_counter()
    st = w.close(timeout=2.0 if mode == "slow" else 30.0)
    print(json.dumps({"digest": digest.hexdigest(), "stats": st.as_dict(), "in_write": in_write, "slept": slept[0],
                      "close_s": time.perf_counter() - t0, "submitted": submitted, "snap": snap}))
    sys.stdout.flush()
    os._exit(0)
    """
)


def run_job(tmp: Path, mode: str, root: Path) -> dict:
    script = tmp / "job.py"
    script.write_text(JOB)
    r = subprocess.run([sys.executable, str(script), str(root), mode], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("control")
    out = run_job(tmp, "ok", tmp / "t")
    assert not out["stats"]["rows_dropped"] and not out["stats"]["rows_pending"]
    return out


def _accounted(out: dict) -> None:
    s = out["stats"]
    for t, n in out["submitted"].items():
        got = s["rows_written"].get(t, 0) + s["rows_dropped"].get(t, 0) + s["rows_pending"].get(t, 0)
        assert got == n, (t, n, s)


def _unchanged(snap: dict) -> None:
    assert snap, "nothing was on disk before the fault"
    for p, h in snap.items():
        assert hashlib.sha256(Path(p).read_bytes()).hexdigest() == h, f"{p} changed after the fault"


def test_full_disk_rlimit_fsize(tmp_path: Path, control: dict) -> None:
    root = tmp_path / "t"
    out = run_job(tmp_path, "fsize", root)
    assert out["digest"] == control["digest"]  # the job's outputs do not depend on the disk
    dropped = out["stats"]["rows_dropped"]
    assert dropped.get("tokens", 0) >= 4 * 20000, dropped  # the oversized parts, counted
    assert any("too large" in e.lower() for e in out["stats"]["errors"]), out["stats"]["errors"]
    _accounted(out)
    _unchanged(out["snap"])
    assert not [f for f in validate(root) if f.level == "error"]
    assert not list(root.rglob(".*.tmp")), "a failed part left its temp file"
    d = info(root)  # the close row fit: info reports the drops
    assert d["rows_dropped"] == dropped and d["runs_not_closed"] == 0
    r = subprocess.run([sys.executable, "-m", "tracekit.cli", "info", str(root)], capture_output=True, text=True)
    assert r.returncode == 0 and "rows dropped by the recorder" in r.stdout, r.stdout


def test_very_slow_disk_never_blocks_the_job(tmp_path: Path, control: dict) -> None:
    root = tmp_path / "t"
    out = run_job(tmp_path, "slow", root)
    assert out["digest"] == control["digest"]
    s = out["stats"]
    assert s["rows_dropped"].get("tokens", 0) > 0, s  # the bounded queue overflowed: counted
    _accounted(out)
    # the job spent almost nothing in write() while the writer slept for seconds
    assert out["slept"] >= 2 and out["in_write"] < out["slept"] / 3, out
    assert out["close_s"] < 2.0 * 3 + 10, out  # close(timeout=2) gives up instead of stalling the exit
    assert not [f for f in validate(root) if f.level == "error"]


def test_unwritable_directory_drops_and_reports(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    w = TraceWriter(blocker / "trace", flush_interval=0.05)
    assert w.write("requests", {"request_id": 1, "run_id": "r"}) is False
    st = w.close(timeout=5)
    assert st.rows_dropped.get("requests") == 1 and st.rows_dropped.get("runs") == 2, st
    assert any("cannot open trace" in e for e in st.errors)
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------------------- tmpfs (root)
def _mount(path: Path, opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the RLIMIT_FSIZE case covers full disks")


@pytest.fixture
def tmpfs(tmp_path: Path):
    mounts: list[Path] = []

    def make(size: str) -> Path:
        p = tmp_path / f"mnt{len(mounts)}"
        _mount(p, f"size={size}")
        mounts.append(p)
        return p

    yield make
    for p in mounts:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def _digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _generate(llm, prompts, steps, rec=None):
    """Seeded sampling per step: the job's outputs (token ids and logprobs) to compare."""
    from vllm import SamplingParams

    outs = []
    for s in steps:
        if rec is not None:
            rec.step(s)
        res = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=24, seed=100 + s, logprobs=0),
                           use_tqdm=False)
        outs.append([(list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs])
                     for o in res])
    return outs


_HOOKS = ("generate", "chat", "collective_rpc", "_tracekit_recorder", "_tracekit_hooks")


@pytest.mark.engine
def test_recorder_on_real_engine_survives_full_then_read_only_disk(engine_pool, tiny_model, tmp_path, tmpfs):
    """A real engine recorded onto a 320 KiB tmpfs (a weight snapshot fills it), which then turns
    read-only mid-run: same outputs as an unrecorded run, drops reported, old parts intact."""
    import safetensors.torch as st

    import tracekit

    llm = engine_pool(tiny_model)
    for name in _HOOKS:
        llm.__dict__.pop(name, None)  # the engine is shared: start unwrapped
    prompts = [f"the quick brown {i}" for i in range(8)]
    want = _generate(llm, prompts, range(5))

    mnt = tmpfs("320k")
    root = mnt / "trace"
    rec = tracekit.Recorder(root, flush_interval=0.1)
    rec.wrap(llm)
    try:
        got = _generate(llm, prompts, range(2), rec=rec)
        rec.flush()
        before = {p: h for p, h in _digest(root).items() if p.endswith(".parquet")}
        # the tiny model's snapshot (MBs) cannot fit: blob writes fail, no half blob stays
        rec.log_weights(1, st.load_file(str(tiny_model / "model.safetensors")), force=True)
        got += _generate(llm, prompts, range(2, 3), rec=rec)
        rec.flush()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        got += _generate(llm, prompts, range(3, 5), rec=rec)
        stats = rec.close(timeout=10)
    finally:
        for name in _HOOKS:
            llm.__dict__.pop(name, None)
    assert got == want  # recording onto a failing disk changed nothing the job sees
    assert rec.errors >= 1 and any("space" in m.lower() for m in rec.error_messages), rec.error_messages
    assert stats.rows_dropped.get("requests", 0) >= 2 * len(prompts), stats  # the read-only steps
    assert not list(root.rglob(".*.tmp")), "a failed write left a temp file on the full disk"
    now = _digest(root)
    for p, h in before.items():
        assert now.get(p) == h, f"{p} changed"
    assert not [f for f in validate(root) if f.level == "error"]  # validate works on a read-only trace
    assert Trace(root).query("SELECT count(*) FROM requests")[0][0] == 3 * len(prompts)
