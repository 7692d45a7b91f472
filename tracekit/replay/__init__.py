"""Replay a recorded trace on another vLLM version or configuration (see docs/replay.md).

``replay(trace, name, ...)`` plans the work (:mod:`.plan`), runs :mod:`.worker` in the target
interpreter (``python=``, default: this one), and writes what streams back into
``replays/<name>/`` with TraceWriter. The ledger (``replay_requests``) makes it resumable:
each chunk's tokens are flushed as a part BEFORE its ledger rows, so a crash can leave tokens
without a ledger row (removed on ``resume``) but never a ledger row without its tokens.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from .. import amx
from ..errors import EngineError, TracekitError
from ..store.location import RemotePath, TraceRoot, copy_path, fs_path, move, replace_text, rmtree

MODES = ("score", "regenerate", "forced", "reference")
REPLAY_META = "replay.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PKG_ROOT = Path(__file__).resolve().parents[2]


class ReplayError(TracekitError):
    """The replay cannot run as asked (bad name, incompatible resume, worker failure)."""


class UnsupportedMode(ReplayError):
    """The target engine cannot run the requested mode (e.g. forced on CPU)."""


@dataclass
class ReplayResult:
    name: str
    mode: str
    path: TraceRoot
    engine_id: str | None = None
    requests_ok: int = 0
    requests_error: int = 0
    requests_skipped: int = 0
    requests_already_done: int = 0
    tokens: int = 0
    seconds: float = 0.0
    target_vllm: str | None = None
    notes: list[str] = field(default_factory=list)
    # (monotonic time, tokens committed so far) after each committed batch: steady-state rates.
    timeline: list[tuple[float, int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def steady_tokens_per_second(self, skip: int = 1) -> float:
        """Tokens/s after the first ``skip`` batches (engine start and warm-up excluded)."""
        if len(self.timeline) <= skip:
            return 0.0
        (t0, n0), (t1, n1) = self.timeline[skip - 1] if skip else (self.timeline[0][0], 0), self.timeline[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def parse_kv(items: list[str] | tuple[str, ...] | None, what: str = "--engine-arg") -> dict[str, Any]:
    """``KEY=VALUE`` strings → dict; a VALUE that parses as JSON is used as JSON, else as string."""
    out: dict[str, Any] = {}
    for it in items or ():
        if "=" not in it:
            raise ReplayError(f"{what} {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise ReplayError(f"{what} {it!r}: empty KEY")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def replay(
    trace: str | os.PathLike[str],
    name: str,
    *,
    python: str | None = None,
    engine_args: dict[str, Any] | None = None,
    hf_overrides: dict[str, Any] | None = None,
    mode: str = "score",
    shard: str | tuple[int, int] | None = None,
    limit: int | None = None,
    resume: bool = False,
    allow_missing_weights: bool = False,
    progress: bool = True,
    model: str | None = None,
    chunk_requests: int = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Re-execute the trace's requests into ``replays/<name>/`` and return the counts.

    ``engine_args`` / ``hf_overrides`` use vLLM's own names and override the recorded engine
    fingerprint one by one; ``model`` replaces a recorded model path that does not exist here.
    ``on_progress(requests, tokens)`` is called after each committed batch (a Ray shard reports
    to the driver's single progress bar with it).
    """
    from ..store.reader import Trace
    from ..store.writer import TraceWriter
    from .plan import build_plan, recorded_engine_args

    if not _NAME_RE.match(name or ""):
        raise ReplayError(f"replay name {name!r}: use letters, digits, '.', '_' or '-'")
    if mode not in MODES:
        raise ReplayError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    overrides = dict(engine_args or {})
    if model:
        overrides["model"] = str(model)
    hf = dict(hf_overrides or {})
    if mode == "reference":
        extra = sorted(set(overrides) - {"model", "dtype"}) + sorted(set(hf) - {"head_dtype"})
        if extra:
            raise ReplayError(f"reference mode takes only --model, --engine-arg dtype and --hf-override head_dtype (got {', '.join(extra)})")
    py = python or sys.executable
    if not Path(py).exists():
        raise ReplayError(f"--python {py}: no such interpreter")

    t = Trace(trace)
    root = t.root
    plan = build_plan(t, name, shard=shard, limit=limit, resume=resume, allow_missing_weights=allow_missing_weights)
    recorded = recorded_engine_args(plan.base_engine)
    if "model" not in recorded and "model" not in overrides:
        raise ReplayError("the trace has no engine fingerprint with a model path; pass --model PATH")
    model_path = overrides.get("model", recorded.get("model"))
    if not Path(str(model_path)).exists():
        raise ReplayError(f"recorded model path {model_path} does not exist here; pass --model PATH")
    shard_s = f"{plan.shard[0]}/{plan.shard[1]}" if plan.shard else None
    meta = {
        "name": name, "mode": mode, "trace_id": t.manifest.get("trace_id"),
        "base_engine_id": plan.base_engine and plan.base_engine.get("engine_id"),
        "recorded_engine_args": recorded, "overrides": {"engine_args": overrides, "hf_overrides": hf},
        "python": py,
        # Every replay_tokens row carries the recorded logprob/weight version at its position: the
        # compare views then read this replay alone for recorded-vs-replay (tracekit/compare/views.py).
        "recorded_copy": True,
    }
    rdir = root / "replays" / name
    if resume or plan.shard:
        _cleanup_orphans(t, name, plan.shard)
    created = _write_meta(rdir, meta, resume=resume)

    res = ReplayResult(name, mode, rdir, requests_already_done=plan.done, notes=list(plan.notes))
    # Its runs/ row comes with the first row: a replay the engine refuses (bad --engine-arg) leaves
    # the trace as it was.
    writer = TraceWriter(root, kind="replay", flush_interval=3600.0)
    t0 = time.monotonic()
    try:
        now = _now()
        if plan.skipped:
            writer.write("replay_requests", [
                {"request_id": rid, "mode": mode, "status": "skipped", "weight_version": v, "num_tokens": 0, "error": why,
                     "shard": shard_s, "time": now} for rid, v, why in plan.skipped], replay=name)
            writer.flush()
            res.requests_skipped = len(plan.skipped)
        if plan.num_requests:
            job = {
                "mode": mode, "trace": str(root), "engine_recorded": recorded, "engine_overrides": overrides,
                "hf_overrides": hf,
                "reference": {"dtype": overrides.get("dtype", "float32"), "head_dtype": hf.get("head_dtype")},
            }
            _run_worker(py, job, t, writer, name, mode, shard_s, plan, res, rdir, progress, chunk_requests,
                        on_progress)
    except BaseException:
        writer.close()
        if created:
            _drop_if_empty(rdir)
        raise
    finally:
        res.seconds = time.monotonic() - t0
        writer.close()
    return res


def _has_parts(rdir: TraceRoot) -> bool:
    return rdir.is_dir() and any(any(d.glob("*.parquet")) for d in rdir.iterdir() if d.is_dir())


def _drop_if_empty(rdir: TraceRoot) -> None:
    """A replay that failed before writing any row leaves no directory (its name stays free)."""
    if not _has_parts(rdir):
        rmtree(rdir)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _write_meta(rdir: TraceRoot, meta: dict[str, Any], *, resume: bool) -> bool:
    """replay.json, written once; a later shard or resume must ask for the same replay.

    True when this call created it."""
    p = rdir / REPLAY_META
    if p.exists():
        old = json.loads(p.read_text())
        for k in ("mode", "overrides", "trace_id"):
            if old.get(k) != meta.get(k):
                raise ReplayError(
                    f"replay {meta['name']!r} exists with {k}={json.dumps(old.get(k))}; this run has "
                    f"{json.dumps(meta.get(k))} (use another --name)"
                )
        return False
    rdir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "created": _now().isoformat()}
    if isinstance(p, RemotePath):
        # No exclusive create on an object store: shards that start together write the same
        # replay (mode, overrides and trace_id are checked above), and the last one stays.
        p.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return True
    tmp = rdir / f".{REPLAY_META}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    try:
        os.link(tmp, p)  # first writer wins when shards start together
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _update_meta(rdir: TraceRoot, **kw: Any) -> None:
    p = rdir / REPLAY_META
    m = json.loads(p.read_text())
    m.update(kw)
    replace_text(p, json.dumps(m, indent=2, default=str) + "\n")


def _cleanup_orphans(trace: Any, name: str, shard: tuple[int, int] | None) -> None:
    """Move away token parts of this shard whose requests have no ledger row (killed mid-chunk).

    Tokens are flushed before their ledger rows, so such a part is the chunk that was being
    committed when the process died; its requests are replayed again.
    """
    import pyarrow.parquet as pq

    from ..schema import table
    from .plan import in_shard, ledger_ids

    tdir = table("replay_tokens").dir(trace.root, name)
    if not tdir.is_dir():
        return
    con = trace.connect(read_only=False, check_parts=False)
    try:
        done = ledger_ids(con, name)
    finally:
        con.close()
    for part in sorted(tdir.glob("*.parquet"), key=str):
        fs, path = fs_path(part)
        ids = set(pq.read_table(path, columns=["request_id"], filesystem=fs).column(0).to_pylist())
        if not ids or ids & done:
            continue
        if all(in_shard(sorted(ids), shard)):
            dest = trace.root / "replays" / name / "orphaned"
            dest.mkdir(exist_ok=True)
            move(part, dest / part.name)


def _feed(stdin: Any, trace: Any, plan: Any, chunk: int, failed: list[BaseException],
          recorded: dict[int, Any]) -> None:
    """Feeder thread: stream 'load' / 'chunk' / 'end' frames to the worker (the pipe blocks
    when the worker is behind, which bounds memory on both sides). Each request's recorded
    values stay here, in ``recorded``, until its result is committed."""
    from .plan import iter_requests
    from .worker import send

    try:
        for g in plan.groups:
            if g.tensors:
                send(stdin, {"type": "load", "version": g.version, "tensors": g.tensors})
            for batch in iter_requests(trace, g, max(1, int(chunk))):
                for req in batch:
                    recorded[req["request_id"]] = req.pop("recorded")
                send(stdin, {"type": "chunk", "version": g.version, "requests": batch})
        send(stdin, {"type": "end"})
    except BrokenPipeError:
        pass  # the worker died or refused the config; the reader reports why
    except BaseException as e:  # noqa: BLE001 - handed to the main thread
        failed.append(e)
    finally:
        try:
            stdin.close()
        except OSError:
            pass


def _run_worker(py: str, job: dict[str, Any], trace: Any, writer: Any, name: str, mode: str, shard_s: str | None,
                plan: Any, res: ReplayResult, rdir: TraceRoot, progress: bool, chunk: int,
                on_progress: Callable[[int, int], None] | None = None) -> None:
    import threading

    from .worker import receive

    tmp = Path(tempfile.mkdtemp(prefix="tracekit-job-"))
    jf = tmp / "job.json"
    jf.write_text(json.dumps(job, default=str))
    # The engine's log lives in the temp dir while it runs and is kept beside the results after.
    log_path = Path(tempfile.gettempdir()) / f"tracekit-replay-{name}-{_now().strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    rfd, wfd = os.pipe()
    env = dict(os.environ)
    # The worker runs this tracekit's code (same pipe protocol) even if the target venv holds
    # another copy; it needs only tracekit's core dependencies + vLLM there.
    env["PYTHONPATH"] = os.pathsep.join([str(_PKG_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    amx.child_env(env)  # AMX hosts: the worker and vLLM's processes below it ask for tile state
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [py, "-m", "tracekit.replay.worker", str(jf), str(wfd)], pass_fds=(wfd,), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env, start_new_session=True,
        )
    os.close(wfd)
    feed_errors: list[BaseException] = []
    recorded: dict[int, Any] = {}  # request_id -> plan.Recorded, from feeding to commit
    feeder = threading.Thread(target=_feed, args=(proc.stdin, trace, plan, chunk, feed_errors, recorded),
                              name="tracekit-replay-feed", daemon=True)
    feeder.start()
    engine_id = uuid.uuid4().hex[:16]
    res.engine_id = engine_id
    pending: list[dict[str, Any]] = []
    error: dict[str, Any] | None = None
    finished = False
    bar = _Progress(progress, plan.num_requests, plan.num_tokens, name, mode)
    try:
        with os.fdopen(rfd, "rb", buffering=1 << 16) as inp, bar:
            for msg in receive(inp):
                kind = msg["type"]
                if kind == "result":
                    pending.append(msg)
                elif kind == "chunk_end":
                    ntok = _commit(writer, pending, name, mode, shard_s, engine_id, res, recorded)
                    res.timeline.append((time.monotonic(), res.tokens))
                    bar.advance(len(pending), ntok)
                    if on_progress is not None:
                        on_progress(len(pending), ntok)
                    pending = []
                elif kind == "started":
                    fp = dict(msg["fingerprint"])
                    fp.update(engine_id=engine_id, run_id=writer.run_id, role="replay")
                    res.target_vllm = fp.get("vllm_version")
                    writer.write("replay_engines", _engine_row(fp), replay=name)
                    _update_meta(rdir, target_vllm_version=fp.get("vllm_version"),
                                 engine_kwargs=msg.get("engine_kwargs"), dropped_recorded_args=msg.get("dropped_args"))
                    if msg.get("dropped_args"):
                        res.notes.append(f"recorded engine args unknown to the target vLLM, dropped: {', '.join(msg['dropped_args'])}")
                elif kind == "loaded":
                    bar.note(f"weights v{msg.get('version')} loaded")
                elif kind == "error":
                    error = msg
                elif kind == "done":
                    finished = True
    except BaseException:
        _kill(proc)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rc = _wait(proc)
    feeder.join(timeout=10)
    if feed_errors:
        raise feed_errors[0]
    if _has_parts(rdir):
        copy_path(log_path, rdir / "logs" / log_path.name)
    if error is not None:
        text = error["message"]
        if error.get("traceback"):
            with open(log_path, "a") as f:
                f.write(error["traceback"])
        if error["kind"] == "unsupported":
            raise UnsupportedMode(text)
        if error["kind"] in ("engine_arg",):
            raise EngineError(text)
        if error["kind"] == "bad_input":
            raise ReplayError(text)
        raise ReplayError(f"replay worker failed: {text} (log: {log_path})")
    if not finished:
        tail = _tail(log_path)
        raise ReplayError(f"replay worker died (exit {rc}) before finishing: {tail} (log: {log_path})")


class _Progress:
    """rich progress bar: requests done / total, tokens/s, ETA (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, tokens: int, name: str, mode: str) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.tokens = 0
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("requests · {task.fields[tps]} tok/s · ETA"), TimeRemainingColumn(),
                              TextColumn("{task.fields[note]}"), transient=False)
            self.task = self.p.add_task(f"replay {name} ({mode})", total=total, tps="-", note="")

    def __enter__(self) -> Self:
        if self.enabled:
            self.p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.p.stop()

    def advance(self, n: int, ntok: int) -> None:
        self.tokens += ntok
        if self.enabled:
            dt = max(time.monotonic() - self.t0, 1e-9)
            self.p.update(self.task, advance=n, tps=f"{self.tokens / dt:,.0f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.p.update(self.task, note=text)


def _commit(writer: Any, results: list[dict[str, Any]], name: str, mode: str, shard_s: str | None,
            engine_id: str, res: ReplayResult, recorded: dict[int, Any]) -> int:
    """Tokens part first (flushed), then the ledger part: never a ledger row without its tokens.

    Each row also carries the recorded logprob and weight version at its (request_id, pos), so
    that recorded-vs-replay queries scan this table alone (docs/benchmarks.md, "Query")."""
    import numpy as np

    if not results:
        return 0
    rid, pos, tok, lp, plp, ent, wv, rlp, rwv = [], [], [], [], [], [], [], [], []
    for r in results:
        n = len(r["token_id"])
        rec = recorded.pop(r["request_id"], None)
        if rec is not None:
            a, b = rec.aligned(n)
            rlp.extend(a)
            rwv.extend(b)
        else:  # not fed by this process (cannot happen today): leave the copy null, never guess
            rlp.extend([None] * n)
            rwv.extend([None] * n)
        rid.extend([r["request_id"]] * n)
        pos.extend(range(n))
        tok.extend(r["token_id"])
        lp.extend(r["logprob"])
        plp.extend(r["processed_logprob"] if r["processed_logprob"] is not None else [None] * n)
        ent.extend(r["entropy"] if r["entropy"] is not None else [None] * n)
        wv.extend([r["weight_version"]] * n)
    if rid:
        writer.write_columns("replay_tokens", {
            "request_id": np.asarray(rid, dtype=np.int64), "pos": np.asarray(pos, dtype=np.int32),
            "token_id": np.asarray(tok, dtype=np.int32), "logprob": lp, "processed_logprob": plp,
            "entropy": ent, "weight_version": wv, "recorded_logprob": rlp,
            "recorded_weight_version": rwv}, replay=name)
        if not writer.flush(timeout=600):
            raise ReplayError("trace writer did not flush replay tokens within 600 s")
    now = _now()
    writer.write("replay_requests", [
        {"request_id": r["request_id"], "engine_id": engine_id, "mode": mode, "status": r["status"],
             "weight_version": r["weight_version"], "num_tokens": len(r["token_id"]),
             "output_token_ids": r["output_token_ids"], "num_agree": r["num_agree"], "error": r["error"],
             "shard": shard_s, "time": now} for r in results], replay=name)
    if not writer.flush(timeout=600):
        raise ReplayError("trace writer did not flush the replay ledger within 600 s")
    st = writer.stats()
    if st.dropped:
        raise ReplayError(f"trace writer dropped rows: {st.errors[-1] if st.errors else st.rows_dropped}")
    for r in results:
        if r["status"] == "ok":
            res.requests_ok += 1
        else:
            res.requests_error += 1
    res.tokens += len(rid)
    return len(rid)


def _engine_row(fp: dict[str, Any]) -> dict[str, Any]:
    from ..schema import table

    cols = set(table("replay_engines").column_names)
    row = {k: v for k, v in fp.items() if k in cols}
    row.setdefault("created_at", _now())
    extra = {k: v for k, v in fp.items() if k not in cols}
    if extra:
        row["extra"] = {**(fp.get("extra") or {}), **extra} if isinstance(fp.get("extra"), dict) else extra
    return row


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop the worker and its engine children (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)


def _wait(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return proc.returncode


def _tail(path: Path, n: int = 1) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return " | ".join(lines[-n:]) if lines else "no output"


__all__ = ["MODES", "ReplayError", "ReplayResult", "UnsupportedMode", "parse_kv", "replay"]
