"""weight_sync: tokens produced by other weights than the version the job (and trainer) believe.

Signature: the engine-side checksum after an update equals the one recorded for another version
(the update did not take effect); the recorded-vs-trainer gap jumps after the first update; a
replay under the claimed version does not reproduce the recorded logprobs while a replay under
the previous version does. Ladder rung: replace the recording by a faithful replay (claimed
weights, same engine config).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ABSENT, INCONCLUSIVE, PRESENT, Ablation, Cause, Evidence, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from ..attribute import Context, Rung

# Syncs whose engine checksum equals the checksum recorded after a sync of ANOTHER version whose
# snapshot differs: the engine holds that other version's weights.
STALE_CHECKSUM_SQL = """
WITH snap AS (SELECT version, string_agg(sha256, ',' ORDER BY name) AS h FROM weights GROUP BY version)
SELECT a.engine_id, a.version AS claimed_version, a.step, b.version AS weights_of_version
FROM weight_syncs a
JOIN weight_syncs b
  ON a.engine_id IS NOT DISTINCT FROM b.engine_id AND a.engine_checksum = b.engine_checksum
 AND a.version <> b.version AND a.engine_checksum IS NOT NULL
LEFT JOIN snap sa ON sa.version = a.version
LEFT JOIN snap sb ON sb.version = b.version
WHERE sa.h IS NULL OR sb.h IS NULL OR sa.h <> sb.h
ORDER BY a.version
"""

FAILED_SYNCS_SQL = "SELECT version, step, error FROM weight_syncs WHERE ok = false ORDER BY version"

SINGLE_VERSION = "weight_version_start IS NOT DISTINCT FROM weight_version_end"


class WeightSync(Cause):
    id = "weight_sync"
    title = "Weight sync: tokens sampled with other weights than the claimed version"
    order = 10
    fix = ("Make the update take effect before sampling resumes and label it from the engine: reload the "
           "NEW checkpoint (llm.collective_rpc('reload_weights', kwargs={'weights_path': NEW_DIR}) / "
           "AsyncLLM pause_generation → reload → update_weight_version(v) → resume_generation), call "
           "llm.reset_prefix_cache() after every update, and verify with compute_weight_checksums that "
           "the engine checksum changed.")

    def evidence(self, ctx: Context) -> list[Evidence]:
        ev: list[Evidence] = []
        versions = ctx.token_versions()
        n_sync = ctx.scalar("SELECT count(*) FROM weight_syncs")
        stale = ctx.rows(STALE_CHECKSUM_SQL)
        ev.append(Evidence(
            f"{len(stale)} of {n_sync} weight update(s) left the engine with another version's weights "
            f"(engine checksum equal to that version's)" if stale else
            f"{n_sync} weight update(s); no engine checksum repeats another version's",
            "tracekit sql TRACE --query weight_sync_checks",
            {"syncs": n_sync, "stale_syncs": len(stale), "examples": stale[:5],
             "checksummed": ctx.scalar("SELECT count(engine_checksum) FROM weight_syncs")},
            True if stale else (False if n_sync else None),
        ))
        failed = ctx.rows(FAILED_SYNCS_SQL)
        if failed:
            ev.append(Evidence(f"{len(failed)} weight update call(s) failed", FAILED_SYNCS_SQL,
                               {"failed": failed[:5]}, True))
        if len(versions) > 1 and ctx.has_trainer:
            first = versions[0]
            g_first, g_later = ctx.con.execute(
                "SELECT avg(abs_delta) FILTER (WHERE weight_version = ?), avg(abs_delta) FILTER (WHERE weight_version > ?) "
                "FROM token_diff('recorded', 'trainer') WHERE finite", [first, first]).fetchone()
            jump = (g_later - g_first) if g_first is not None and g_later is not None else None
            ev.append(Evidence(
                f"recorded-vs-trainer mean |Δ| {_f(g_first)} on version {first}, {_f(g_later)} after updates",
                "tracekit diff TRACE --by weight_version",
                {"gap_first_version": g_first, "gap_after_updates": g_later, "jump": jump, "versions": len(versions)},
                None if jump is None else jump > ctx.t.material_gap,
            ))
        elif len(versions) <= 1:
            ev.append(Evidence("a single weight version in the trace: nothing was synced", "tracekit info TRACE",
                               {"single_version": versions}, False))
        return ev

    def ablation(self, ctx: Context, evidence: list[Evidence]) -> Ablation | None:
        return Ablation(faithful=True)

    def decide(self, ctx: Context, evidence: list[Evidence], rung: Rung | None) -> Verdict:
        stale = any(e.signal for e in evidence if "stale_syncs" in e.numbers or "failed" in e.numbers)
        single = any(e.signal is False and "single_version" in e.numbers for e in evidence)
        if rung is None or rung.replay is None:
            if stale:
                return Verdict(PRESENT, "the engine checksum after an update shows another version's weights")
            if single:
                return Verdict(ABSENT, "a single weight version: no update to get wrong")
            if any(e.signal for e in evidence if "jump" in e.numbers):
                return Verdict(INCONCLUSIVE, "the gap jumps after weight updates; run with replays to confirm")
            return Verdict(ABSENT, "no checksum repeat and no jump of the gap at updates (no replay run)")
        mode = ctx.recorded_mode
        faithful = ctx.source(rung.replay, mode)
        repro = ctx.metrics("recorded", faithful, where=SINGLE_VERSION)
        tol = ctx.repro_tol(rung.replay)
        evidence.append(Evidence(
            f"recorded vs a replay under the claimed weights ({faithful}): mean |Δ| {_f(repro.mean_abs_delta)} "
            f"on {repro.tokens} tokens (same engine config; must reproduce to ≤ {tol})",
            f"tracekit diff TRACE --a recorded --b {faithful} --by weight_version",
            {"mean_abs_delta": repro.mean_abs_delta, "tokens": repro.tokens, "max_abs_delta": repro.max_abs_delta},
            None if repro.mean_abs_delta is None else repro.mean_abs_delta > tol,
        ))
        if repro.mean_abs_delta is None or repro.mean_abs_delta <= tol:
            if stale:
                return Verdict(INCONCLUSIVE, "a checksum repeats another version's, yet a replay under the "
                               "claimed weights reproduces the recorded logprobs")
            return Verdict(ABSENT, f"a replay under the claimed weights reproduces the recorded logprobs "
                           f"(mean |Δ| {_f(repro.mean_abs_delta)})")
        prev = self._previous_version(ctx, evidence, mode)
        if prev is not None:
            d_prev, d_claim, _src = prev
            if d_prev is not None and d_claim is not None and d_prev < 0.5 * d_claim:
                return Verdict(PRESENT, f"recorded logprobs match the PREVIOUS weight version (mean |Δ| "
                               f"{_f(d_prev)}) better than the claimed one ({_f(d_claim)})")
        if stale:
            return Verdict(PRESENT, "the engine checksum after an update shows another version's weights, "
                           "and a replay under the claimed weights does not reproduce the recording")
        return Verdict(INCONCLUSIVE, f"a replay under the claimed weights does not reproduce the recording "
                       f"(mean |Δ| {_f(repro.mean_abs_delta)}) and the previous version does not explain it")

    def _previous_version(self, ctx: Context, evidence: list[Evidence], mode: str) -> tuple | None:
        from ..attribute import ReplayConfig

        if len(ctx.snapshot_versions()) < 2:
            return None
        base = ctx.replay_for(ReplayConfig())
        name = ctx.replay_for(ReplayConfig(requests="previous_version"))
        if name is None or base is None:
            return None
        where = (f"{SINGLE_VERSION} AND request_id IN (SELECT request_id FROM replay_requests "
                 f"WHERE replay = '{name}' AND status = 'ok')")
        src = ctx.source(name, mode)
        d_prev = ctx.metrics("recorded", src, where=where).mean_abs_delta
        d_claim = ctx.metrics("recorded", ctx.source(base, mode), where=where).mean_abs_delta
        evidence.append(Evidence(
            f"recorded vs a replay under the version BEFORE the claimed one: mean |Δ| {_f(d_prev)} "
            f"(claimed version: {_f(d_claim)})",
            f"tracekit diff TRACE --a recorded --b {src} --by weight_version",
            {"previous_version_mean_abs_delta": d_prev, "claimed_version_mean_abs_delta": d_claim},
            None if d_prev is None or d_claim is None else d_prev < 0.5 * d_claim,
        ))
        return d_prev, d_claim, src


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


CAUSE = WeightSync()
