"""Weight versions of the weight changes a job pushes itself.

A job that reloads weights with ``collective_rpc("reload_weights", ...)`` (or vLLM's
weight-transfer calls) and does not label the engine would leave every later token with the old
label. The adapters (llm.py, async_llm.py) report every such call here; ``Versions`` decides the
label the engine gets (``tracekit-<run>-<n>``, set by the adapter right after the change with no
engine step in between) and later maps that label to a version:

1. the version the job states next: ``rec.log_weights(v, ...)``, or an integer label of its own
   (``set_weight_version`` / ``update_weight_version`` / ``finish_weight_update(v)``) set after
   the change; a label the job set before the change (no request in between) is kept as is;
2. a ``rec.log_weights(v, path)`` made before the change, when the change loads that same path;
3. otherwise, at the next change of that engine, ``Recorder(version_wait=...)`` seconds after the
   change, or at close: ``initial_weight_version + k`` for the k-th change when the job never
   stated the version of any change (zero-code numbering), else unknown (null tokens, version -1
   in ``weight_syncs``).

Samples whose tokens carry a label that is not resolved yet are held (bounded) and written as
soon as it is. docs/recording.md ("Weight versions") is the user-facing description.
"""
# ruff: noqa: BLE001  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import datetime as _dt
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recorder import Recorder

# Calls after which the engine holds a complete new set of weights.
COMPLETE = frozenset({"reload_weights", "finish_weight_update"})
# Calls of a weight-transfer session (start, chunks): the weights are in flux until it finishes.
PARTIAL = frozenset({"start_weight_update", "update_weights"})
DRAFT = "start_draft_weight_update"  # a session that changes the speculative draft model only
WEIGHT_METHODS = COMPLETE | PARTIAL | {DRAFT}

# At most this many held tokens wait for their version; beyond it the oldest open change is
# resolved by the fallback rule at once.
HOLD_MAX_TOKENS = 1 << 21


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING: Any = _Pending()  # a label whose version is not resolved yet


def _int(label: Any) -> int | None:
    try:
        return int(label)
    except (TypeError, ValueError):
        return None


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class Change:
    """One observed weight change of one engine."""

    def __init__(self, n: int, tag: str, engine: _Engine, method: str, path: str | None) -> None:
        self.n = n
        self.engine_key = engine.key
        self.engine_id = engine.engine_id
        self.method = method
        self.path = path
        self.label = f"tracekit-{tag}-{n}"  # the recorder's label for the weights after the change
        self.flux_label = f"{self.label}-in-flux"  # while the weights change (unknown)
        self.ordinal = 0  # k-th completed change of this engine
        self.job_label: str | None = None  # the job labeled the engine itself for this change
        self.t_start = _now()
        self.t_end: _dt.datetime | None = None
        self.checksums: Any = None
        self.ok = True
        self.complete = False
        self.resolved = False
        self.version: int | None = None
        self.how = ""
        self.notes: list[str] = []
        self.step: int | None = None
        self.snap_rows: list[dict] | None = None  # zero-code snapshot of ``path``, named if ordinal
        self.snapshot = False
        self.row_written = False
        self.returned = False  # a sample with tokens under ``label`` went back to the job


class Plan:
    """What an adapter does around one weight call."""

    __slots__ = ("before", "change", "complete", "label_after")

    def __init__(self, change: Change, before: str | None, label_after: str | None, complete: bool) -> None:
        self.change = change
        self.before = before  # label to set before the call ('in flux': steps until label_after are unknown)
        self.label_after = label_after  # label to set right after it (None: the job's own label stays)
        self.complete = complete  # the call completes the change (reload, finish of a session)


class _Engine:
    __slots__ = ("baselined", "current", "draft", "engine_id", "job_label", "key", "ordinal", "open",
                 "seq_change", "seq_label", "seq_submit", "session")

    def __init__(self, key: str, engine_id: str | None, initial: int | None) -> None:
        self.key = key
        self.engine_id = engine_id
        self.ordinal = 0  # completed changes
        self.current: int | None = initial  # version the engine holds, when known
        self.open: Change | None = None  # latest completed change (resolved or not)
        self.session: Change | None = None  # weight-transfer session in progress
        self.draft = False
        self.baselined = False
        self.job_label: str | None = None
        self.seq_change = self.seq_submit = self.seq_label = 0


class Versions:
    """Label ↔ version bookkeeping of one Recorder (thread-safe; callers catch its errors)."""

    def __init__(self, rec: Recorder, wait: float, write: Callable[[dict], None]) -> None:
        self.rec = rec
        self.wait = float(wait)
        self.write = write  # writes one sample (emit_sample's kwargs) whose labels are resolved
        self.tag = rec.run_id[:8]
        self.serial = itertools.count(1)
        self.seq = itertools.count(1)
        self.lock = threading.RLock()
        self.engines: dict[str, _Engine] = {}
        self.by_label: dict[str, Change] = {}
        self.flux: dict[str, Change] = {}
        self.stated = False  # the job stated the version of some change: no ordinal fallback
        self.pre: dict[str, int] = {}  # log_weights(v, path) while no change was open: path -> v
        self.held: list[tuple[dict, set[str], int]] = []  # (sample, open labels, tokens)
        self.held_tokens = 0
        self.held_total = 0  # samples ever held (tests and docs report it)
        self.timers: list[threading.Timer] = []
        self.snap_calls = 0
        self.closed = False

    def engine(self, key: str, engine_id: str | None = None) -> _Engine:
        e = self.engines.get(key)
        if e is None:
            e = self.engines[key] = _Engine(key, engine_id, self.rec.initial_weight_version)
        if e.engine_id is None:
            e.engine_id = engine_id
        return e

    # ------------------------------------------------------------------ engine events
    def submit(self, key: str) -> int:
        """A request goes to the engine; returns its change count (compare after the request)."""
        with self.lock:
            e = self.engine(key)
            e.seq_submit = next(self.seq)
            return e.ordinal + (e.session is not None)

    def change_count(self, key: str) -> int:
        with self.lock:
            e = self.engine(key)
            return e.ordinal + (e.session is not None)

    def job_label(self, key: str, label: Any) -> None:
        """The job labeled the engine itself; its label tags the tokens it covers. An integer label
        set after a change, before any sample with tokens of that change went back to the job,
        also states that change's version (after such a sample it is taken as the label of the
        NEXT change: label first, then reload)."""
        with self.lock:
            e = self.engine(key)
            v = _int(label)
            ch = e.open
            if ch is not None and not ch.resolved and not ch.returned:
                if v is not None:
                    self.stated = True
                    self._resolve(ch, v, "stated by the job's own engine label after the change")
                else:
                    ch.notes.append(f"the job labeled the engine {label!r} after the change (not an integer)")
            e.seq_label = next(self.seq)
            e.job_label = None if label is None else str(label)
            e.current = v

    def before(self, key: str, engine_id: str | None, method: str, path: str | None, *,
               in_flight: bool) -> Plan | None:
        """A weight call is about to run: the labels to set around it (None: not a change of the
        model's weights). ``in_flight``: the engine may step while the call runs (no pause), so an
        'in flux' label goes first and tokens of steps until the after-label are unknown."""
        with self.lock:
            e = self.engine(key, engine_id)
            if method == DRAFT:
                e.draft = True
                return None
            if e.draft:  # chunks and finish of a draft-model session: the sampled model is unchanged
                e.draft = method != "finish_weight_update"
                return None
            if e.session is not None:
                ch = e.session
                if method in COMPLETE:
                    e.session = None
                    return Plan(ch, None, None if ch.job_label else ch.label, True)
                return Plan(ch, None, None, False)
            ch = Change(next(self.serial), self.tag, e, method, path)
            self.by_label[ch.label] = ch
            self.flux[ch.flux_label] = ch
            if e.job_label is not None and e.seq_label > max(e.seq_change, e.seq_submit):
                ch.job_label = e.job_label  # labeled for this change, no request since: the job's label
            if method in PARTIAL:  # a session starts: in flux until finish_weight_update
                e.session = ch
                return Plan(ch, None if ch.job_label else ch.flux_label, None, False)
            before = ch.flux_label if in_flight and not ch.job_label else None
            return Plan(ch, before, None if ch.job_label else ch.label, True)

    def after(self, plan: Plan, *, ok: bool, error: str | None = None, checksums: Any = None,
              notes: Sequence[str] = ()) -> None:
        """The weight call returned (or raised)."""
        with self.lock:
            ch = plan.change
            e = self.engine(ch.engine_key)
            ch.notes.extend(notes)
            if not ok:
                ch.ok = False
                ch.notes.insert(0, f"failed: {error}")
                if e.session is ch:
                    e.session = None
                self._complete(e, ch)
                self._resolve(ch, None, "unknown: the weight call failed, the engine's weights are unknown")
                return
            if not plan.complete:
                return
            ch.checksums = checksums
            self._complete(e, ch)
            if ch.job_label is not None:
                v = _int(ch.job_label)
                self.stated = self.stated or v is not None
                self._resolve(ch, v, "stated by the job's own engine label before the change" if v is not None
                              else f"unknown: the job's own label {ch.job_label!r} is not an integer")
            elif ch.path is not None and ch.path in self.pre:
                self.stated = True
                self._resolve(ch, self.pre.pop(ch.path), "stated by rec.log_weights(v, path) before the change "
                              "(same path)")
            else:
                self._arm(ch)

    def baseline_due(self, key: str) -> bool:
        """True once per engine, before the first weight change the job pushes, when the version
        the engine holds is known and snapshotted (``rec.log_weights(0, ...)``): the adapter then
        checksums those weights (``baseline``), so a later push that leaves them in the engine
        matches a row of their version (STALE_CHECKSUM_SQL). Without a snapshot no row is written:
        the replay takes a version that was never synced for the model as loaded."""
        with self.lock:
            e = self.engine(key)
            due = not e.baselined and e.ordinal == 0 and e.session is None and e.current is not None \
                and self.rec.has_snapshot(e.current)
            e.baselined = True
            return due

    def baseline(self, key: str, checksums: Any) -> None:
        with self.lock:
            e = self.engine(key)
            if checksums is None or e.current is None:
                return
            self.rec.write_weight_sync(
                engine_id=e.engine_id, version=e.current, step=self.rec.current_step, t_start=_now(),
                method="baseline", checksums=checksums, ok=True, snapshot=False,
                error=f"engine checksum of the weights it held (version {e.current}) before the first weight "
                      "change the job pushed itself",
            )

    def _complete(self, e: _Engine, ch: Change) -> None:
        prev = e.open
        if prev is not None and prev is not ch and not prev.resolved:
            self._fallback(prev, "no version stated before the next weight change")
        e.ordinal += 1
        e.seq_change = next(self.seq)
        ch.ordinal = e.ordinal
        ch.complete = True
        ch.t_end = _now()
        ch.step = self.rec.current_step
        e.open = ch
        e.current = None

    def _arm(self, ch: Change) -> None:
        if self.wait <= 0 or self.closed:
            return
        t = threading.Timer(self.wait, self._expire, (ch,))
        t.daemon = True
        self.timers = [x for x in self.timers if x.is_alive()]
        self.timers.append(t)
        t.start()

    def _expire(self, ch: Change) -> None:
        try:
            with self.lock:
                if not ch.resolved:
                    self._fallback(ch, f"no version stated within {self.wait:g} s of the change")
        except Exception as e:
            self.rec.count_error(f"versions: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ statements
    def statement(self, version: int, path: str | None, step: int | None) -> list[Change]:
        """``rec.log_weights(version, path)``: resolves every engine's open change; returns them
        (their weight_syncs rows are the caller's to write, after its snapshot)."""
        out: list[Change] = []
        with self.lock:
            for e in self.engines.values():
                ch = e.open
                if ch is None or ch.resolved:
                    continue
                if step is not None:
                    ch.step = step
                if path is not None and ch.path is not None and path != ch.path:
                    ch.notes.append(f"the job stated version {version} with weights from {path}, the engine "
                                    f"loaded {ch.path}")
                self.stated = True
                self._resolve(ch, version, "stated by rec.log_weights after the change", write=False)
                out.append(ch)
            if not out and path is not None and any(e.current != version for e in self.engines.values()):
                self.pre[path] = version  # stated before it is pushed: the change loading ``path`` takes it
        return out

    def pushed(self, key: str, engine_id: str | None, version: int) -> None:
        """The recorder's own update_weights put ``version`` into the engine (and labeled it)."""
        with self.lock:
            e = self.engine(key, engine_id)
            if e.open is not None and not e.open.resolved:
                self._fallback(e.open, "superseded by rec.update_weights")
            self.stated = True
            e.open = None
            e.baselined = True  # the recorder's own row has this version's checksum
            e.current = int(version)
            e.seq_change = next(self.seq)

    # ------------------------------------------------------------------ resolution
    def _fallback(self, ch: Change, why: str) -> None:
        init = self.rec.initial_weight_version
        if not self.stated and ch.ok and init is not None:
            self._resolve(ch, init + ch.ordinal, f"ordinal {ch.ordinal} of the observed weight changes "
                          f"(zero-code numbering: {why})")
        else:
            self._resolve(ch, None, f"unknown: {why}")

    def _resolve(self, ch: Change, version: int | None, how: str, *, write: bool = True) -> None:
        if ch.resolved:
            return
        ch.resolved, ch.version, ch.how = True, version, how
        e = self.engines.get(ch.engine_key)
        if e is not None and e.open is ch:
            e.current = version
        if ch.snap_rows is not None:
            self._name_snapshot(ch)
        if write:
            self.write_row(ch)
        self._release(ch.label)

    def write_row(self, ch: Change, snapshot: bool = False) -> None:
        """The change's weight_syncs row: the claimed version (-1: unknown), checksum, how, notes."""
        if ch.row_written or not ch.complete:
            return
        ch.row_written = True
        who = f"the job's label {ch.job_label!r}" if ch.job_label else f"tracekit's label {ch.label!r}"
        self.rec.write_weight_sync(
            engine_id=ch.engine_id, version=-1 if ch.version is None else ch.version, step=ch.step,
            t_start=ch.t_start, t_end=ch.t_end, method=f"collective_rpc:{ch.method}", checksums=ch.checksums,
            ok=ch.ok, error="; ".join([f"version {ch.how}", f"engine tagged with {who}", *ch.notes]),
            snapshot=snapshot or ch.snapshot,
        )
        ch.checksums = None  # written; a long job keeps one small Change per weight change

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for t in self.timers:
                t.cancel()
            for e in self.engines.values():
                if e.session is not None:
                    ch, e.session = e.session, None
                    self._complete(e, ch)
                    self._resolve(ch, None, "unknown: the weight-transfer session never finished")
                if e.open is not None and not e.open.resolved:
                    self._fallback(e.open, "no version stated before the recorder closed")
            for ch in self.by_label.values():  # calls that never returned
                self._resolve(ch, None, "unknown: the weight call never returned", write=False)
            self._release(None)

    # ------------------------------------------------------------------ labels → versions
    def version_of(self, label: Any) -> Any:
        """Version of an engine label: int, None (unknown) or PENDING (change not resolved yet)."""
        if label is None:
            return None
        if label == "default":
            return self.rec.initial_weight_version
        ch = self.by_label.get(label)
        if ch is not None:
            return ch.version if ch.resolved else PENDING
        if label in self.flux:
            return None
        return _int(label)

    def why_unknown(self, label: Any) -> str | None:
        ch = self.by_label.get(label)
        if ch is not None:
            return f"weight change {ch.ordinal} ({ch.method}): version {ch.how}"
        ch = self.flux.get(label)
        if ch is not None:
            return f"computed while the weights changed ({ch.method}): unknown"
        return None

    def tokens(self, spans: Sequence[tuple[Any, int, int]], n: int) -> Any:
        """Per-token versions of label spans [(label, start, end)] as (versions, first, last,
        reasons for unknown ones), or PENDING. List operations per span, no per-token Python."""
        out: list = []
        why: list[str] = []
        with self.lock:
            for label, s, t in spans:
                v = self.version_of(label)
                if v is PENDING:
                    return PENDING
                s, t = max(0, min(n, s)), max(0, min(n, t))
                if s > len(out):
                    out.extend([None] * (s - len(out)))
                if t > s:
                    out.extend([v] * (t - s))
                if v is None and (w := self.why_unknown(label) or (None if label is None else f"engine label {label!r}")):
                    why.append(w)
        out.extend([None] * (n - len(out)))
        del out[n:]
        return out, out[0] if n else None, out[-1] if n else None, why

    # ------------------------------------------------------------------ held samples
    def place(self, sample: dict) -> None:
        """Write ``sample`` now if its labels are resolved, else hold it until they are."""
        with self.lock:
            labels = set()
            for lb, _, _ in sample["weight_labels"]:
                ch = self.by_label.get(lb)
                if ch is not None and not ch.resolved:
                    ch.returned = True
                    labels.add(lb)
            if not labels or self.closed:
                self.write(sample)
                return
            n = len(sample.get("output_token_ids") or ())
            self.held.append((sample, labels, n))
            self.held_tokens += n
            self.held_total += 1
            while self.held_tokens > HOLD_MAX_TOKENS and self.held:
                oldest = min((self.by_label[lb] for lb in self.held[0][1]), key=lambda c: c.n)
                self._fallback(oldest, f"more than {HOLD_MAX_TOKENS} tokens waited for its version")

    def _release(self, label: str | None) -> None:
        """Write the held samples that waited for ``label`` only (None: all of them)."""
        if not self.held:
            return
        keep, ready = [], []
        for sample, labels, n in self.held:
            labels.discard(label)  # type: ignore[arg-type]
            (ready if label is None or not labels else keep).append((sample, labels, n))
        self.held = keep
        self.held_tokens = sum(n for _, _, n in keep)
        for sample, _, _ in ready:
            self.write(sample)

    # ------------------------------------------------------------------ zero-code snapshots
    def wants_snapshot(self, ch: Change) -> bool:
        """Snapshot the reloaded path now (before the job can overwrite it) while the job has
        never stated a version: the ordinal fallback then names it. Honors snapshot_every."""
        with self.lock:
            if self.stated or not ch.ok or not ch.complete or ch.path is None or ch.resolved:
                return False
            every = self.rec.snapshot_every
            take = every > 0 and self.snap_calls % every == 0
            self.snap_calls += 1
            return take

    def snapshot_taken(self, ch: Change, rows: list[dict]) -> None:
        with self.lock:
            ch.snap_rows = rows
            if ch.resolved:
                self._name_snapshot(ch)

    def _name_snapshot(self, ch: Change) -> None:
        rows, ch.snap_rows = ch.snap_rows, None
        if rows and ch.version is not None and ch.how.startswith("ordinal"):
            ch.snapshot = self.rec.add_snapshot_rows(ch.version, rows, ch.step)
        # else: a job that states versions snapshots them with log_weights; an unknown version has no name
