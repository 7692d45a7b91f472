"""Recorder: the object a job holds. Owns the trace writer, request ids, step/group context,
weight versions, snapshots and trainer logprobs; the per-surface adapters (llm.py,
async_llm.py, proxy.py) hand it finished samples.

Safety contract: nothing here raises into the job. Every hook catches its own failures, counts
them (``Recorder.errors``) and the writer turns disk problems into counted drops.
"""
# ruff: noqa: BLE001, S110  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import itertools
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..store.writer import TraceWriter, WriterStats

log = logging.getLogger("tracekit.recorder")

_F = TypeVar("_F", bound=Callable[..., Any])

# SamplingParams fields worth recording (feature-detected: only those the engine has).
SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
    "ignore_eos", "logprobs", "prompt_logprobs", "logit_bias", "allowed_token_ids", "bad_words",
    "include_stop_str_in_output", "skip_special_tokens", "logprob_token_ids",
)
# Scalar columns of `requests` that mirror the resolved params.
_SCALAR_COLS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def safe(default: Any = None) -> Callable[[_F], _F]:
    """Decorator for recorder hooks: log and count a failure, return ``default``, never raise."""

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def inner(self: Any, *a: Any, **kw: Any) -> Any:
            try:
                return fn(self, *a, **kw)
            except Exception as e:
                rec = getattr(self, "recorder", self)
                rec._count_error(f"{fn.__name__}: {type(e).__name__}: {e}")
                return default

        return inner  # type: ignore[return-value]

    return deco


def params_dict(sp: Any) -> dict[str, Any]:
    """JSON-able dict of a SamplingParams (only the fields listed in SAMPLING_FIELDS it has)."""
    out: dict[str, Any] = {}
    for f in SAMPLING_FIELDS:
        if hasattr(sp, f):
            v = getattr(sp, f)
            if isinstance(v, (set, tuple)):
                v = list(v)
            out[f] = v
    return json.loads(json.dumps(out, default=str))


@functools.lru_cache(maxsize=1)
def _default_params() -> dict[str, Any]:
    from vllm import SamplingParams

    return params_dict(SamplingParams())


def requested_dict(sp: Any, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fields the caller set: those differing from ``base``, by default vLLM's SamplingParams()
    (for params from ``llm.get_default_sampling_params()``: the fields they had when handed out,
    so the model's generation_config defaults are not taken for the caller's request)."""
    if sp is None:
        return {}
    d = params_dict(sp)
    if base is None:
        base = _default_params()
    return {k: v for k, v in d.items() if base.get(k, object()) != v}


def parse_version(label: Any, default: int | None) -> int | None:
    """Engine weight-version label → int64 version ('default' = never labeled → ``default``)."""
    if label is None:
        return None
    if label == "default":
        return default
    try:
        return int(label)
    except (TypeError, ValueError):
        return None


class Recorder:
    """Record a vLLM RL job into a trace directory.

    ``snapshot_every``: store a weight snapshot every N ``log_weights``/``update_weights`` calls
    (1 = every version, 0 = never). ``initial_weight_version``: version of the weights the engine
    was started with (what an unlabeled engine's tokens are tagged with). ``version_wait``:
    seconds a weight change the job pushed itself waits for the job to state its version
    (``log_weights``) before the fallback rule names it (see capture/versions.py).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        snapshot_every: int = 1,
        initial_weight_version: int | None = 0,
        flush_interval: float = 1.0,
        kind: str = "record",
        meta: dict[str, Any] | None = None,
        max_queue_rows: int = 8 << 20,
        version_wait: float = 30.0,
    ) -> None:
        self.writer = TraceWriter(out_dir, kind=kind, flush_interval=flush_interval, meta=meta,
                                  max_queue_rows=max_queue_rows)
        self.root = self.writer.root  # a local Path or a store.location.RemotePath (s3://...)
        self.run_id = self.writer.run_id
        self.snapshot_every = int(snapshot_every)
        self.initial_weight_version = initial_weight_version
        self._prefix = secrets.randbits(22) << 40
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._step: int | None = None
        self._group: str | None = None
        self._weight_logs = 0
        self._snapshotted: set[int] = set()
        self._tmpdirs: list[str] = []
        self._last_checksum: dict[str, str | None] = {}
        self.engine_versions: dict[str, int | None] = {}  # engine_id -> last version pushed
        self.errors = 0
        self.error_messages: list[str] = []
        self.closed = False
        self._wrapped: list[weakref.ref[Any]] = []
        from .versions import Versions

        self.versions = Versions(self, version_wait, self._write_sample)

    # ------------------------------------------------------------------ ids and context
    def new_request_id(self) -> int:
        return self._prefix | next(self._counter)

    def step(self, n: int | None) -> None:
        """Set the RL step stamped on every request recorded from now on."""
        self._step = None if n is None else int(n)

    @property
    def current_step(self) -> int | None:
        return self._step

    @property
    def current_group(self) -> str | None:
        """The group id of the enclosing ``rec.group(...)`` block, if any."""
        return self._group

    @contextlib.contextmanager
    def group(self, group_id: str | int) -> Iterator[None]:
        """Requests issued inside share ``group_id`` (overrides the automatic grouping)."""
        prev, self._group = self._group, str(group_id)
        try:
            yield
        finally:
            self._group = prev

    @staticmethod
    def request_ids(outputs: Any) -> list[list[int]] | list[int]:
        """tracekit request ids of vLLM outputs: a list per RequestOutput (one id per choice).

        Also available as ``completion_output.tracekit_request_id``.
        """
        if hasattr(outputs, "outputs"):
            return [getattr(c, "tracekit_request_id", None) for c in outputs.outputs]
        return [[getattr(c, "tracekit_request_id", None) for c in o.outputs] for o in outputs]

    # ------------------------------------------------------------------ wrapping
    def wrap(self, engine: Any, *, engine_args: Mapping[str, Any] | None = None) -> Any:
        """Record every request of a ``vllm.LLM`` or ``AsyncLLM``; returns the SAME object.

        The object keeps its type; only its generate/chat/collective_rpc get recording hooks.
        An engine wrapped by another recorder is taken over (its hooks are replaced, not
        stacked); ``close()`` or ``unwrap()`` removes them.
        """
        try:
            if getattr(engine, "_tracekit_recorder", None) is self:
                return engine
            if getattr(engine, "_tracekit_recorder", None) is not None:
                _remove_hooks(engine)
            if hasattr(engine, "llm_engine") and hasattr(engine, "generate"):
                from .llm import wrap_llm

                self._wrapped.append(weakref.ref(engine))
                return wrap_llm(self, engine, engine_args)
            if hasattr(engine, "engine_core") and hasattr(engine, "generate"):
                from .async_llm import wrap_async_llm

                self._wrapped.append(weakref.ref(engine))
                return wrap_async_llm(self, engine, engine_args)
            self._count_error(f"wrap: unsupported engine type {type(engine).__name__}")
        except Exception as e:
            self._count_error(f"wrap: {type(e).__name__}: {e}")
        return engine

    @safe(default=None)
    def register_engine(self, engine: Any, *, surface: str, engine_args: Mapping[str, Any] | None = None,
                        extra: Mapping[str, Any] | None = None) -> str | None:
        """Write the engine's fingerprint once; return its engine_id."""
        from .fingerprint import fingerprint_llm

        row = fingerprint_llm(engine, role="record", surface=surface, engine_args=engine_args,
                              run_id=self.run_id, extra=extra)
        self.writer.write("engines", row)
        return row["engine_id"]

    def write_engine_row(self, row: Mapping[str, Any]) -> None:
        self.writer.write("engines", dict(row))

    # ------------------------------------------------------------------ samples
    def emit_sample(
        self,
        *,
        request_id: int,
        engine_id: str | None,
        surface: str,
        engine_request_id: str | None,
        prompt_token_ids: Sequence[int] | None,
        output_token_ids: Sequence[int],
        logprobs: Sequence[float | None] | None,
        requested: Mapping[str, Any] | None,
        resolved: Mapping[str, Any] | None,
        num_logprobs: int | None,
        finish_reason: str | None,
        stop_reason: Any,
        num_cached_tokens: int | None,
        t_submit: _dt.datetime | None,
        t_first_token: _dt.datetime | None,
        t_finish: _dt.datetime | None,
        group_id: str | None,
        sample_idx: int | None,
        step: int | None,
        token_versions: Sequence[int | None] | None = None,
        version_start: int | None = None,
        version_end: int | None = None,
        weight_labels: Sequence[tuple[Any, int, int]] | None = None,
        top_token_ids: Sequence[Sequence[int]] | None = None,
        top_logprobs: Sequence[Sequence[float]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one ``requests`` row and its ``tokens`` rows (never raises).

        Weight versions: either ``token_versions`` (+ start/end) as known to the caller, or
        ``weight_labels`` = the engine's label spans ``[(label, start, end)]`` (vLLM's
        ``CompletionOutput.weight_versions``, or one span of the label read around the call);
        the recorder maps labels to versions and holds the sample while a label it set on a
        weight change the job pushed is not resolved yet (``Recorder.versions``).
        """
        sample = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        try:
            if weight_labels is not None:
                self.versions.place(sample)
            else:
                self._write_sample(sample)
        except Exception as e:
            self._count_error(f"emit_sample: {type(e).__name__}: {e}")

    def _write_sample(self, s: dict[str, Any]) -> None:
        try:
            ids = s["output_token_ids"]
            n = len(ids)
            tv, vs, ve = s["token_versions"], s["version_start"], s["version_end"]
            extra = dict(s["extra"]) if s["extra"] else {}
            if s["weight_labels"] is not None:
                tv, vs, ve, why = self.versions.tokens(s["weight_labels"], n)
                if why:
                    extra["weight_version_unknown"] = sorted(set(why) | set(extra.get("weight_version_unknown") or ()))
            res = dict(s["resolved"] or {})
            stop = s["stop_reason"]
            row: dict[str, Any] = {
                "request_id": s["request_id"], "run_id": self.run_id, "engine_id": s["engine_id"],
                "engine_request_id": s["engine_request_id"], "surface": s["surface"], "step": s["step"],
                "group_id": s["group_id"], "sample_idx": s["sample_idx"],
                "prompt_token_ids": list(s["prompt_token_ids"]) if s["prompt_token_ids"] is not None else None,
                "output_token_ids": list(ids),
                "sampling_requested": dict(s["requested"] or {}), "sampling_resolved": res,
                "num_logprobs": s["num_logprobs"], "finish_reason": s["finish_reason"],
                "stop_reason": None if stop is None else str(stop),
                "weight_version_start": vs, "weight_version_end": ve,
                "num_cached_tokens": s["num_cached_tokens"], "t_submit": s["t_submit"],
                "t_first_token": s["t_first_token"], "t_finish": s["t_finish"],
                "extra": extra or None,
            }
            for c in _SCALAR_COLS:
                v = res.get(c)
                row[c] = v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
            self.writer.write("requests", row)
            if n:
                lps = s["logprobs"]
                cols: dict[str, Any] = {
                    "pos": range(n),
                    "token_id": list(ids),
                    "logprob": list(lps) if lps is not None else [None] * n,
                    "weight_version": list(tv) if tv is not None else [None] * n,
                }
                if s["top_token_ids"] is not None:
                    cols["top_token_ids"] = list(s["top_token_ids"])
                    cols["top_logprobs"] = list(s["top_logprobs"] or [])
                self.writer.write_columns("tokens", cols, request_id=s["request_id"])
        except Exception as e:
            self._count_error(f"emit_sample: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ trainer side
    @safe(default=False)
    def log_trainer_logprobs(
        self, request_id: int, logprobs: Any, *, step: int | None = None, policy_version: int | None = None,
        entropy: Any = None, start_pos: int = 0,
    ) -> bool:
        """The trainer's own per-token logprobs of a recorded sample (positions from ``start_pos``)."""
        lp = _to_list(logprobs)
        cols: dict[str, Any] = {"pos": range(start_pos, start_pos + len(lp)), "logprob": lp}
        if entropy is not None:
            cols["entropy"] = _to_list(entropy)
        return self.writer.write_columns(
            "trainer", cols, request_id=int(request_id), policy_version=policy_version,
            step=self._step if step is None else step,
        )

    @safe(default=False)
    def log_reward(self, request_id: int, reward: float, *, step: int | None = None) -> bool:
        """The reward of a recorded sample (its own table: the request row is already written)."""
        return self.writer.write("rewards", {
            "request_id": int(request_id), "reward": float(reward), "run_id": self.run_id, "time": _now(),
            "step": self._step if step is None else step,
        })

    # ------------------------------------------------------------------ weights
    @safe(default=False)
    def log_weights(self, version: int, source: Any, *, step: int | None = None, force: bool = False) -> bool:
        """Store a snapshot of ``version`` (tensors dict, state_dict, safetensors file or directory).

        Also the job's statement that ``version`` is now live: a weight change it pushed itself
        since its last statement (``collective_rpc("reload_weights")``) gets this version (see
        "Weight versions" in docs/recording.md). Honors ``snapshot_every`` unless ``force``. Blob
        writing happens in the calling thread (it is I/O the caller asked for); failures are
        counted, never raised.
        """
        version = int(version)
        changes = []
        try:
            changes = self.versions.statement(version, source_path(source), step)
        except Exception as e:
            self._count_error(f"log_weights({version}) statement: {type(e).__name__}: {e}")
        took = False
        try:
            took = self._log_snapshot(version, source, step, force)
        finally:
            for ch in changes:
                self.versions.write_row(ch, snapshot=version in self._snapshotted)
        return took

    def _log_snapshot(self, version: int, source: Any, step: int | None, force: bool) -> bool:
        with self._lock:
            take = force or (self.snapshot_every > 0 and self._weight_logs % self.snapshot_every == 0)
            self._weight_logs += 1
        if not take or version in self._snapshotted:
            return False
        rows = self.snapshot_blobs(source, step)
        if not rows:  # e.g. a directory of .bin/.pt files: never unpickled, so nothing to store
            self._count_error(f"log_weights({version}): no safetensors tensors found in {source!r:.200}")
            return False
        return self.add_snapshot_rows(version, rows, step)

    def snapshot_blobs(self, source: Any, step: int | None) -> list[dict[str, Any]]:
        """Write ``source``'s tensors as blobs now; return their ``weights`` rows, not yet queued
        (``add_snapshot_rows`` names and queues them)."""
        from ..store.weights import put_tensors

        return put_tensors(self.root, _iter_tensors(source), version=-1, run_id=self.run_id,
                           step=self._step if step is None else step)

    def has_snapshot(self, version: int) -> bool:
        """Whether this recorder stored a snapshot of ``version``."""
        return version in self._snapshotted

    def add_snapshot_rows(self, version: int, rows: list[dict[str, Any]], step: int | None) -> bool:
        """Queue snapshot rows (from ``snapshot_blobs``) as ``version``; False if it has one."""
        with self._lock:
            if version in self._snapshotted:
                return False
            self._snapshotted.add(version)
        for r in rows:
            r["version"] = version
            if step is not None:
                r["step"] = step
        return self.writer.write("weights", rows)

    def weights_dir(self, source: Any, model_dir: str | None) -> str:
        """A directory vLLM's reload_weights can read: the source itself, or a temp checkpoint."""
        if isinstance(source, (str, os.PathLike)):
            p = Path(source)
            if not p.exists():
                from ..errors import WeightsError

                raise WeightsError(f"weights path does not exist: {p}")
            return str(p if p.is_dir() else p.parent)
        import safetensors.torch as st

        d = tempfile.mkdtemp(prefix="tracekit-weights-")
        self._tmpdirs.append(d)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in _iter_tensors(source)}
        st.save_file(tensors, os.path.join(d, "model.safetensors"))
        # vLLM re-reads config/generation defaults from the reload path (in-process engines).
        if model_dir and Path(model_dir).is_dir():
            for f in Path(model_dir).iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")) and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, os.path.join(d, f.name))
        return d

    def write_weight_sync(
        self, *, engine_id: str | None, version: int, step: int | None, t_start: _dt.datetime,
        method: str, checksums: Any, ok: bool, error: str | None, snapshot: bool,
        t_end: _dt.datetime | None = None,
    ) -> None:
        flat = _flatten_checksums(checksums)
        digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest() if flat else None
        prev = self._last_checksum.get(engine_id or "")
        if digest is not None and prev == digest and ok:
            note = "engine weights unchanged by this update (checksum equals the previous sync)"
            error = f"{error}; {note}" if error else note
        if digest is not None:
            self._last_checksum[engine_id or ""] = digest
        self.writer.write("weight_syncs", {
            "engine_id": engine_id, "run_id": self.run_id, "version": int(version),
            "step": self._step if step is None else step, "t_start": t_start, "t_end": t_end or _now(),
            "method": method, "engine_checksum": digest, "engine_checksums": flat, "snapshot": snapshot,
            "ok": ok, "error": error,
        })

    def update_weights(self, llm: Any, version: int, source: Any, *, step: int | None = None,
                       snapshot: bool | None = None) -> bool:
        """Push new weights into an offline ``vllm.LLM`` through the recorder.

        Reloads (``collective_rpc('reload_weights')``), labels the engine with ``str(version)``,
        resets the prefix cache, checksums the engine's weights and records a ``weight_syncs`` row
        (plus a snapshot per ``snapshot_every``). Errors from the engine itself (bad path,
        incompatible tensors) are raised to the caller like a direct reload would; recording
        failures are not.
        """
        from .llm import update_llm_weights

        return update_llm_weights(self, llm, version, source, step=step, snapshot=snapshot)

    async def update_weights_async(self, engine: Any, version: int, source: Any, *, step: int | None = None,
                                   snapshot: bool | None = None, pause: bool = True,
                                   reset_running_requests: bool = False) -> bool:
        """AsyncLLM flavour: pause(keep) → reload → label → reset prefix cache → resume, so the
        engine-side label is exact for every token, including tokens of in-flight streams."""
        from .async_llm import update_async_weights

        return await update_async_weights(self, engine, version, source, step=step, snapshot=snapshot,
                                          pause=pause, reset_running_requests=reset_running_requests)

    def snapshot_version(self, version: int, source: Any, step: int | None, snapshot: bool | None) -> bool:
        """The snapshot an update pushed through the recorder takes (``snapshot``: None = per
        ``snapshot_every``, True = always, False = never)."""
        if snapshot is False:
            return False
        try:
            return self._log_snapshot(int(version), source, step, bool(snapshot))
        except Exception as e:
            self._count_error(f"snapshot of version {version}: {type(e).__name__}: {e}")
            return False

    # ------------------------------------------------------------------ lifecycle
    def count_error(self, msg: str) -> None:
        """Count (and log at most three times) a recording failure; never raises."""
        self._count_error(msg)

    def _count_error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_messages) < 100:
            self.error_messages.append(msg)
        if self.errors <= 3:
            log.warning("tracekit recorder: %s", msg)
        try:
            self.writer._error(f"recorder: {msg}")
        except Exception:
            pass

    def flush(self, timeout: float | None = 30.0) -> bool:
        try:
            return self.writer.flush(timeout)
        except Exception:
            return False

    def stats(self) -> WriterStats:
        return self.writer.stats()

    def unwrap(self, engine: Any) -> Any:
        """Remove this recorder's hooks from ``engine`` (a no-op if another recorder owns it)."""
        if getattr(engine, "_tracekit_recorder", None) is self:
            _remove_hooks(engine)
        return engine

    def close(self, timeout: float | None = 30.0) -> WriterStats:
        """Flush and close; reports drops (also written to ``runs/`` and shown by ``info``).

        Engines this recorder wrapped are unwrapped, so a long-lived engine does not keep
        recording into a closed trace.
        """
        if self.closed:
            return self.writer.stats()
        self.closed = True
        for ref in self._wrapped:
            eng = ref()
            if eng is not None:
                try:
                    self.unwrap(eng)
                except Exception as e:  # noqa: BLE001
                    self._count_error(f"unwrap: {e}")
        try:  # versions of the job's last weight changes; held samples are written
            self.versions.close()
        except Exception as e:
            self._count_error(f"versions close: {type(e).__name__}: {e}")
        try:
            st = self.writer.close(timeout)
        except Exception as e:
            self._count_error(f"close: {e}")
            st = self.writer.stats()
        for d in self._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        if st.dropped or self.errors:
            log.warning("tracekit: %d rows dropped %s, %d recorder errors (trace %s)", st.dropped,
                        st.rows_dropped, self.errors, self.root)
        return st

    def __enter__(self) -> Recorder:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers
class Hooks:
    """Base of an engine's hooks object (llm.py, async_llm.py): installs methods as instance
    attributes (on the engine and on objects it owns), remembers what was there, puts it back.

    A hook only records while its object is the engine's current ``_tracekit_hooks``: hooks left
    behind on a shared engine by code that dropped the attributes by hand pass straight through.
    """

    def __init__(self, recorder: Recorder, engine: Any) -> None:
        self.recorder = recorder
        self.engine = engine
        self.key = f"engine-{id(engine):x}"  # the engine's key in ``Recorder.versions``
        self.installed: list[tuple[Any, str, Any, Any]] = []  # (object, name, original, hook)

    @property
    def live(self) -> bool:
        return self.engine.__dict__.get("_tracekit_hooks") is self

    def original(self, obj: Any, name: str) -> Any:
        for o, n, orig, _ in self.installed:
            if o is obj and n == name:
                return orig
        return None

    def install(self, obj: Any, name: str, hook: Any) -> Any:
        """Put ``hook`` in place of ``obj.name``; return the original it wraps (None: no such method)."""
        cur = getattr(obj, name, None)
        if cur is None:
            return None
        owner = getattr(cur, "__self__", None)
        while isinstance(owner, Hooks) and owner.original(obj, name) is not None:  # a stale tracekit hook
            cur = owner.original(obj, name)
            owner = getattr(cur, "__self__", None)
        setattr(obj, name, hook)
        self.installed.append((obj, name, cur, hook))
        return cur

    def job_labeled(self, label: Any) -> None:
        """The job set the engine's weight-version label itself (``Versions.job_label``)."""
        if self.live:
            try:
                self.recorder.versions.job_label(self.key, label)
            except Exception as e:
                self.recorder.count_error(f"job label: {type(e).__name__}: {e}")

    def weight_call_done(self, plan: Any, *, ok: bool, error: str | None = None, checksums: Any = None,
                         notes: Sequence[str] = ()) -> None:
        """A weight call the recorder planned labels for returned or raised (``Versions.after``)."""
        try:
            self.recorder.versions.after(plan, ok=ok, error=error, checksums=checksums, notes=notes)
        except Exception as e:
            self.recorder.count_error(f"observe {plan.change.method}: {type(e).__name__}: {e}")

    def remove(self) -> None:
        for obj, name, orig, hook in reversed(self.installed):
            if obj.__dict__.get(name) is not hook:
                continue  # replaced since: not ours to restore
            if getattr(orig, "__self__", None) is obj and getattr(orig, "__func__", None) is getattr(type(obj), name, None):
                del obj.__dict__[name]  # back to the class method
            else:
                setattr(obj, name, orig)  # the user's own patch underneath ours
        self.installed.clear()


def _remove_hooks(engine: Any) -> None:
    """Put back every method a wrap replaced: the class's own, or whatever was there before."""
    hooks = engine.__dict__.get("_tracekit_hooks")
    if isinstance(hooks, Hooks):
        hooks.remove()
    engine.__dict__.pop("_tracekit_hooks", None)
    engine.__dict__.pop("_tracekit_recorder", None)


def source_path(source: Any) -> str | None:
    """The checkpoint directory a weights source names (None for tensors in memory), so a stated
    version's source can be compared with the path the engine reloaded."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    p = Path(source)
    try:
        p = p.resolve()
        if p.is_file():
            p = p.parent
    except OSError:
        pass
    return str(p)


def _to_list(x: Any) -> list[float]:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    if hasattr(x, "tolist"):
        return [float(v) for v in x.tolist()]
    return [float(v) for v in x]


def _iter_tensors(source: Any) -> Iterable[tuple[str, Any]]:
    """(name, tensor) pairs from a dict/state_dict, a safetensors file, or a directory of them."""
    if isinstance(source, Mapping):
        return list(source.items())
    if hasattr(source, "state_dict") and callable(source.state_dict):
        return list(source.state_dict().items())
    if isinstance(source, (str, os.PathLike)):
        from safetensors import safe_open

        p = Path(source)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        out = []
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    out.append((k, fh.get_tensor(k)))
        return out
    if isinstance(source, Iterable):
        return list(source)
    raise TypeError(f"cannot read weights from {type(source).__name__}")


def _flatten_checksums(cs: Any) -> dict[str, str] | None:
    """compute_weight_checksums returns one dict per worker: merge them as 'rank/name'."""
    if cs is None:
        return None
    if isinstance(cs, Mapping):
        return {str(k): str(v) for k, v in cs.items()}
    if isinstance(cs, (list, tuple)):
        if len(cs) == 1 and isinstance(cs[0], Mapping):
            return {str(k): str(v) for k, v in cs[0].items()}
        out = {}
        for i, d in enumerate(cs):
            if isinstance(d, Mapping):
                out.update({f"{i}/{k}": str(v) for k, v in d.items()})
        return out or None
    return None
