"""Replay shards as Ray tasks: ``tracekit replay TRACE --name N --ray [ADDRESS]`` (docs/scale.md).

Each shard ``i/K`` is one Ray task whose body is the local :func:`tracekit.replay.replay` with
``shard=(i, K), resume=True``: it starts the replay worker in the target interpreter on the node
Ray placed it on and streams its parts into the same trace, exactly like ``--shard i/K`` run by
hand. Resume is what makes a Ray retry safe: a task whose worker or node died runs again, moves
its orphaned token parts aside and replays only the requests its shard has no ledger row for.

The driver does the up-front checks of a local run once (name, mode, "exists without --resume",
missing weights), holds one named progress actor (also a guard against a second driver on the
same replay), and draws one rich bar over all shards. Ray is imported lazily: it is an optional
extra (``tracekit[ray]``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..errors import TracekitError
from ..store.location import is_uri
from . import _NAME_RE, MODES, ReplayError, ReplayResult

# Driver env vars every shard needs: S3 credentials and endpoint, vLLM and tracekit knobs, HF
# cache/token, and the import path the driver runs tracekit from. Credentials travel in the task's
# runtime env only; the trace never holds them.
ENV_PREFIXES = ("AWS_", "VLLM_", "TRACEKIT_", "HF_")
NAMESPACE = "tracekit"


def replay_on_ray(
    trace: str | os.PathLike[str],
    name: str,
    *,
    address: str | None = None,
    shards: int | None = None,
    num_gpus_per_shard: float = 0,
    num_cpus_per_shard: float = 1,
    python: str | None = None,
    engine_args: dict[str, Any] | None = None,
    hf_overrides: dict[str, Any] | None = None,
    mode: str = "score",
    resume: bool = False,
    allow_missing_weights: bool = False,
    model: str | None = None,
    chunk_requests: int = 64,
    progress: bool = True,
    max_retries: int = 3,
) -> ReplayResult:
    """Replay ``trace`` into ``replays/<name>/`` as ``shards`` Ray tasks; the counts of all shards.

    ``address``: None joins the cluster in ``RAY_ADDRESS`` or one started here with ``ray start``,
    else starts a local one (``ray.init()``); ``"auto"``, ``"host:port"`` or ``"ray://..."``
    connect. When Ray is already initialised in this process (a Ray program calling us), it is
    used as is. ``shards=None``: as many as the cluster's CPUs (or GPUs) hold at once.
    ``num_gpus_per_shard=G > 1`` runs one tensor-parallel engine per shard over its G GPUs.
    A task whose worker or node dies is retried ``max_retries`` times (it resumes its shard); an
    exception raised by the replay itself (a bad engine arg) is not retried and is raised here as
    the same :class:`~tracekit.errors.TracekitError` a local replay raises.
    """
    ray = _import_ray()
    from ..store.reader import Trace
    from .plan import build_plan

    if not _NAME_RE.match(name or ""):
        raise ReplayError(f"replay name {name!r}: use letters, digits, '.', '_' or '-'")
    if mode not in MODES:
        raise ReplayError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if shards is not None and shards < 1:
        raise ReplayError(f"--shards {shards}: need at least 1")
    if num_gpus_per_shard < 0 or num_cpus_per_shard < 0:
        raise ReplayError("--num-gpus-per-shard and --num-cpus-per-shard must be >= 0")
    notes: list[str] = []
    ea = dict(engine_args or {})
    if num_gpus_per_shard > 1:
        if num_gpus_per_shard != int(num_gpus_per_shard):
            raise ReplayError(f"--num-gpus-per-shard {num_gpus_per_shard}: above 1 it must be a whole number of GPUs")
        if "tensor_parallel_size" not in ea:
            ea["tensor_parallel_size"] = int(num_gpus_per_shard)
            notes.append(f"each shard's engine runs tensor_parallel_size={int(num_gpus_per_shard)} over its "
                         f"{int(num_gpus_per_shard)} GPUs (--engine-arg tensor_parallel_size=N to change it)")
    # Tasks run elsewhere (another cwd, another node): local paths go out absolute. A URI
    # (s3://...) goes through untouched.
    trace_s = _abs(trace)
    kw: dict[str, Any] = dict(
        python=_abs(python) if python else None, engine_args=ea, hf_overrides=dict(hf_overrides or {}), mode=mode,
        allow_missing_weights=allow_missing_weights, model=_abs(model) if model else None,
        chunk_requests=chunk_requests,
    )

    # What a local run checks before it starts an engine, once for all shards: an existing replay
    # without --resume, versions without snapshots. The total is the bar's.
    t = Trace(trace_s)
    plan = build_plan(t, name, resume=resume, allow_missing_weights=allow_missing_weights)
    before = _ledger_counts(t, name)
    trace_id = str(t.manifest.get("trace_id") or "")

    t0 = time.monotonic()
    started = False
    if not ray.is_initialized():
        _init(ray, address)
        started = True
    try:
        if shards is None:
            shards = _fit_shards(ray, num_gpus_per_shard, num_cpus_per_shard)
            notes.append(f"{shards} shard(s): what the cluster runs at once (--shards K to choose)")
        res = _run(ray, trace_s, name, trace_id, shards, num_cpus_per_shard, num_gpus_per_shard, max_retries,
                   kw, plan.num_requests, plan.num_tokens, mode, progress, notes, resume)
    finally:
        if started:
            ray.shutdown()
    after = _ledger_counts(Trace(trace_s), name)
    res.requests_ok = after.get("ok", (0, 0))[0] - before.get("ok", (0, 0))[0]
    res.requests_error = after.get("error", (0, 0))[0] - before.get("error", (0, 0))[0]
    res.requests_skipped = after.get("skipped", (0, 0))[0] - before.get("skipped", (0, 0))[0]
    res.tokens = sum(v[1] for v in after.values()) - sum(v[1] for v in before.values())
    res.requests_already_done = plan.done
    res.seconds = time.monotonic() - t0
    return res


def _run(ray: Any, trace: str, name: str, trace_id: str, k: int, cpus: float, gpus: float, max_retries: int,
         kw: dict[str, Any], total: int, total_tokens: int, mode: str, progress: bool,
         notes: list[str], resume: bool) -> ReplayResult:
    from ..store.reader import Trace
    from . import _cleanup_orphans, _Progress

    runtime_env = {"env_vars": forwarded_env()}
    actor_cls = ray.remote(_ShardProgress)
    # Named per trace and replay: a second driver on the same replay fails here instead of
    # replaying the same shards twice at once. Not detached: it dies with this driver.
    actor_name = f"replay:{trace_id}:{name}"
    try:
        actor = actor_cls.options(name=actor_name, namespace=NAMESPACE, num_cpus=0, runtime_env=runtime_env,
                                  max_restarts=0).remote(k)
    except ValueError:
        raise ReplayError(f"a Ray replay {name!r} of this trace is already running on this cluster "
                          f"(actor {actor_name!r} in namespace {NAMESPACE!r}); wait for it to end or stop its job") from None
    if resume:
        # Token parts of an earlier run killed mid-batch, whatever its sharding (local --shard I/N,
        # another K): moved aside once, here, while no shard runs. Each shard's own clean-up only
        # moves parts wholly inside its shard of this K, which would miss them.
        _cleanup_orphans(Trace(trace), name, None)
    task = ray.remote(_run_shard)
    opts = dict(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False, runtime_env=runtime_env)
    refs = {task.options(name=f"tracekit-replay:{name}:{i}/{k}", **opts).remote(actor, trace, name, (i, k), kw): i
            for i in range(k)}
    results: dict[int, ReplayResult] = {}
    bar = _Progress(progress, total, total_tokens, name, mode)
    res = ReplayResult(name, mode, None)  # type: ignore[arg-type]  # path: from the shards' results
    seen = (0, 0)
    try:
        with bar:
            bar.note(f"0/{k} shards done")
            pending = dict(refs)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    i = pending.pop(ref)
                    results[i] = _get(ray, ref, i, k, max_retries)
                reqs, toks = ray.get(actor.totals.remote())
                if (reqs, toks) != seen:
                    bar.advance(reqs - seen[0], toks - seen[1])
                    seen = (reqs, toks)
                    res.timeline.append((time.monotonic(), toks))
                bar.note(f"{len(results)}/{k} shards done")
            attempts = ray.get(actor.attempts.remote())
    except BaseException:
        _stop(ray, refs)
        raise
    finally:
        ray.kill(actor)
    for i, n in sorted(attempts.items()):
        if n > 1:
            notes.append(f"shard {i}/{k} ran {n} times: Ray retried it after its worker died (resumed, no row twice)")
    first = next(iter(results.values()))
    res.path = first.path
    res.target_vllm = next((r.target_vllm for r in results.values() if r.target_vllm), None)
    for n in [*notes, *(x for i in sorted(results) for x in results[i].notes)]:
        if n not in res.notes:
            res.notes.append(n)
    return res


def _run_shard(progress: Any, trace: str, name: str, shard: tuple[int, int], kw: dict[str, Any]) -> ReplayResult:
    """Ray task body: the local replay of one shard, reporting each committed batch."""
    import ray

    from . import replay

    ctx = ray.get_runtime_context()
    ray.get(progress.started.remote(shard[0], os.getpid(), ctx.get_node_id()))

    def on_progress(requests: int, tokens: int) -> None:
        progress.advance.remote(shard[0], requests, tokens)  # fire and forget: never slows the shard

    return replay(trace, name, shard=shard, resume=True, progress=False, on_progress=on_progress, **kw)


class _ShardProgress:
    """Ray actor: requests/tokens committed per shard, and each shard's attempts (pid, node)."""

    def __init__(self, k: int) -> None:
        self.done: dict[int, tuple[int, int]] = {i: (0, 0) for i in range(k)}
        self.runs: dict[int, list[tuple[int, str]]] = {i: [] for i in range(k)}

    def started(self, shard: int, pid: int, node: str) -> None:
        self.runs[shard].append((pid, node))

    def advance(self, shard: int, requests: int, tokens: int) -> None:
        n, t = self.done[shard]
        self.done[shard] = (n + requests, t + tokens)

    def totals(self) -> tuple[int, int]:
        return sum(n for n, _ in self.done.values()), sum(t for _, t in self.done.values())

    def shards(self) -> dict[int, tuple[int, int]]:
        """shard → (requests, tokens) committed, over all its attempts."""
        return self.done

    def attempts(self) -> dict[int, int]:
        return {i: len(r) for i, r in self.runs.items()}

    def workers(self) -> dict[int, list[tuple[int, str]]]:
        """shard → [(Ray worker pid, node id)] per attempt, the current one last."""
        return self.runs


def _stop(ray: Any, refs: dict[Any, int]) -> None:
    """A shard failed or the driver was interrupted: cancel the others and collect their ends
    (a failed result nobody reads is logged by Ray as an unhandled error)."""
    for ref in refs:
        ray.cancel(ref)
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=30)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001, S110 - the first failure is what the user sees
            pass


def _get(ray: Any, ref: Any, i: int, k: int, max_retries: int) -> ReplayResult:
    """A shard's result; its failure as the one-line error a local replay gives."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, TracekitError):
            raise cause from None
        from ..store.reader import one_line

        what = f"{type(cause).__name__}: {one_line(cause)}" if cause is not None else one_line(e)
        raise ReplayError(f"shard {i}/{k} failed: {what}") from None
    except ray.exceptions.RayError as e:
        raise ReplayError(
            f"shard {i}/{k}: {type(e).__name__} after {max_retries} retries (worker or node died); "
            "the rows written so far are kept: re-run with --resume") from None


def forwarded_env(environ: dict[str, str] | os._Environ[str] | None = None) -> dict[str, str]:
    """The driver's env vars a shard needs (``AWS_*``, ``VLLM_*``, ``TRACEKIT_*``, ``HF_*``, PYTHONPATH)."""
    env = os.environ if environ is None else environ
    out = {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)}
    if env.get("PYTHONPATH"):
        out["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return out


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ReplayError("--ray needs Ray: pip install 'tracekit[ray]'") from None
    return ray


def _init(ray: Any, address: str | None) -> None:
    kw: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
    try:
        if address in (None, "local"):
            ray.init(address=address, include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ReplayError(f"--ray {address or ''}: cannot start or join a Ray cluster: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _fit_shards(ray: Any, gpus: float, cpus: float) -> int:
    res = ray.cluster_resources()
    if gpus > 0:
        return max(1, int(res.get("GPU", 0) // gpus))
    return max(1, int(res.get("CPU", 1) // cpus)) if cpus > 0 else 1


def _ledger_counts(t: Any, name: str) -> dict[str, tuple[int, int]]:
    """status → (requests, tokens) in this replay's ledger."""
    rows = t.query("SELECT status, count(*), coalesce(sum(num_tokens), 0) FROM replay_requests "
                   "WHERE replay = ? GROUP BY 1", [name])
    return {s: (int(n), int(k)) for s, n, k in rows}


def _abs(p: str | os.PathLike[str]) -> str:
    s = os.fspath(p)
    return s if is_uri(s) else os.path.abspath(s)


__all__ = ["ENV_PREFIXES", "forwarded_env", "replay_on_ray"]

