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
from .context import SINGLE_VERSION, ReplayConfig

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context, Rung

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

# Tokens the trainer scored under another policy version than the engine sampled them with (the
# recorder tags each token with the engine's version; the trainer states its own).
TRAINER_VERSION_SQL = """
SELECT count(*) AS tokens,
       count(*) FILTER (WHERE t.weight_version <> tr.policy_version) AS mismatched,
       count(DISTINCT t.request_id) FILTER (WHERE t.weight_version <> tr.policy_version) AS requests,
       count(*) FILTER (WHERE t.weight_version <> tr.policy_version AND r.weight_version_start
                        IS DISTINCT FROM r.weight_version_end) AS mismatched_in_mixed_requests,
       avg(abs(t.logprob - tr.logprob)) FILTER (WHERE t.weight_version <> tr.policy_version
                                               AND isfinite(t.logprob - tr.logprob)) AS gap_mismatched,
       avg(abs(t.logprob - tr.logprob)) FILTER (WHERE t.weight_version = tr.policy_version
                                               AND isfinite(t.logprob - tr.logprob)) AS gap_matched
FROM tokens AS t JOIN trainer AS tr ON t.request_id = tr.request_id AND t.pos = tr.pos
JOIN requests AS r ON r.request_id = t.request_id
WHERE t.weight_version IS NOT NULL AND tr.policy_version IS NOT NULL
"""

UNKNOWN_VERSION_SQL = "SELECT count(*) FILTER (WHERE weight_version IS NULL) AS unknown, count(*) AS tokens FROM tokens"


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
                None if jump is None else jump > ctx.cal.material,
            ))
        if ctx.has_trainer:
            tv = ctx.rows(TRAINER_VERSION_SQL)[0]
            # Evidence only where the mismatched tokens also disagree more: a trainer that labels its
            # versions otherwise (a constant, another numbering) but scores right is not a fault.
            gm, gk = tv["gap_mismatched"], tv["gap_matched"]
            sig = None
            if tv["mismatched"]:
                sig = gm is not None and gm > (gk if gk is not None else ctx.cal.floor_used) + ctx.cal.material
            ev.append(Evidence(
                f"{tv['mismatched']} of {tv['tokens']} token(s) in {tv['requests']} request(s) were sampled with "
                f"another weight version than the policy_version the trainer scored them under (mean |Δ| "
                f"{_f(gm)} there, {_f(gk)} where the versions agree)",
                TRAINER_VERSION_SQL.strip(), {"trainer_version_mismatch": tv}, sig,
            ))
        unk = ctx.rows(UNKNOWN_VERSION_SQL)[0]
        if unk["unknown"]:
            ev.append(Evidence(
                f"{unk['unknown']} of {unk['tokens']} token(s) have no weight version (the recorder could not "
                "know it, see the weight_syncs notes); they are left out of version checks",
                "tracekit sql TRACE \"SELECT * FROM weight_syncs\"", {"unknown_version_tokens": unk}, None,
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
        mismatch = any(e.signal for e in evidence if "trainer_version_mismatch" in e.numbers)
        if mismatch:
            return Verdict(PRESENT, "the trainer scored tokens under another weight version than the engine "
                           "sampled them with (an update landed mid-request or the trainer's version is off)")
        why = ctx.unknown("tokens.weight_version", "weight_syncs")
        if rung is None or rung.replay is None:
            if why and not stale:
                return Verdict(INCONCLUSIVE, f"{why}; only a replay under each claimed version can tell")
            if stale:
                return Verdict(PRESENT, "the engine checksum after an update shows another version's weights")
            if single:
                return Verdict(ABSENT, "a single weight version: no update to get wrong")
            if any(e.signal for e in evidence if "jump" in e.numbers):
                return Verdict(INCONCLUSIVE, "the gap jumps after weight updates; run with replays to confirm")
            return Verdict(ABSENT, "no checksum repeat and no jump of the gap at updates (no replay run)")
        mode = ctx.recorded_mode
        faithful = ctx.source(rung.replay, mode)
        first = ctx.first_version()
        later = SINGLE_VERSION + ("" if first is None else f" AND weight_version_start > {int(first)}")
        repro = ctx.metrics("recorded", faithful, where=later)
        tol = ctx.cal.tol
        evidence.append(Evidence(
            f"recorded vs a replay under the claimed weights ({faithful}) after the first update: mean |Δ| "
            f"{_f(repro.mean_abs_delta)} on {repro.tokens} tokens (reproduces within {tol:.3g} = "
            f"{ctx.t.noise_k:g} × the replay noise {_f(ctx.cal.noise)} measured before any update)",
            f"tracekit diff TRACE --a recorded --b {faithful} --by weight_version",
            {"mean_abs_delta": repro.mean_abs_delta, "tokens": repro.tokens, "max_abs_delta": repro.max_abs_delta,
             "tolerance": tol},
            None if repro.mean_abs_delta is None else repro.mean_abs_delta > tol,
        ))
        if repro.mean_abs_delta is None or repro.mean_abs_delta <= tol:
            if single:
                return Verdict(ABSENT, "a single weight version: no update to get wrong")
            if stale:
                return Verdict(INCONCLUSIVE, "a checksum repeats another version's, yet a replay under the "
                               "claimed weights reproduces the recorded logprobs")
            return Verdict(ABSENT, f"a replay under the claimed weights reproduces the recorded logprobs after "
                           f"every update (mean |Δ| {_f(repro.mean_abs_delta)} ≤ {tol:.3g})")
        prev = self._previous_version(ctx, evidence, mode, later)
        if prev is not None:
            d_prev, d_claim = prev
            if d_prev is not None and d_claim is not None and d_prev < 0.5 * d_claim:
                return Verdict(PRESENT, f"recorded logprobs match the PREVIOUS weight version (mean |Δ| "
                               f"{_f(d_prev)}) better than the claimed one ({_f(d_claim)})")
        hit = ctx.metrics("recorded", faithful, where=f"{later} AND cache_hit")
        miss = ctx.metrics("recorded", faithful, where=f"{later} AND NOT cache_hit")
        stale_kv = (hit.tokens > 0 and (hit.mean_abs_delta or 0) > tol
                    and (miss.tokens == 0 or (miss.mean_abs_delta or 0) <= tol))
        evidence.append(Evidence(
            f"after updates, requests with prefix-cache hits: mean |Δ| {_f(hit.mean_abs_delta)} to the faithful "
            f"replay on {hit.tokens} tokens; without hits: {_f(miss.mean_abs_delta)} on {miss.tokens}",
            "tracekit sql TRACE --query prefix_cache_hits",
            {"stale_kv": stale_kv, "gap_hits": hit.mean_abs_delta, "gap_misses": miss.mean_abs_delta}, stale_kv,
        ))
        if stale_kv:
            return Verdict(PRESENT, "after weight updates only requests that hit the prefix cache differ from the "
                           "claimed weights: they reused KV computed with older weights (prefix cache not reset)")
        if stale:
            return Verdict(PRESENT, "the engine checksum after an update shows another version's weights, "
                           "and a replay under the claimed weights does not reproduce the recording")
        return Verdict(INCONCLUSIVE, f"a replay under the claimed weights does not reproduce the recording "
                       f"(mean |Δ| {_f(repro.mean_abs_delta)} > {tol:.3g}) and neither the previous version nor "
                       "the prefix cache explains it")

    def fix_for(self, ctx: Context, evidence: list[Evidence]) -> str:
        """The fix for what the evidence shows (all of it when nothing specific did)."""
        fixes = []
        tv = next((e.numbers["trainer_version_mismatch"] for e in evidence
                   if e.signal and "trainer_version_mismatch" in e.numbers), None)
        if tv and tv.get("mismatched_in_mixed_requests"):
            fixes.append("Score every token under the weights that sampled it (tokens.weight_version, vLLM's "
                         "CompletionOutput.weight_versions spans), or update between requests: AsyncLLM "
                         "pause_generation → reload → update_weight_version(v) → resume_generation.")
        if tv and tv["mismatched"] > (tv.get("mismatched_in_mixed_requests") or 0):
            fixes.append("The engine never held the version the trainer scores with (a skipped or failed push): "
                         "reload the NEW checkpoint (llm.collective_rpc('reload_weights', kwargs={'weights_path': "
                         "NEW_DIR})) before sampling the next step, and check the engine checksum changed.")
        if any(e.signal for e in evidence if "stale_kv" in e.numbers):
            fixes.append("Call llm.reset_prefix_cache() after every weight update (AsyncLLM: "
                         "reset_prefix_cache(reset_running_requests=True)), or enable_prefix_caching=False.")
        if any(e.signal for e in evidence if "previous_version_mean_abs_delta" in e.numbers
               or "stale_syncs" in e.numbers or "failed" in e.numbers):
            fixes.append("Reload the NEW checkpoint (llm.collective_rpc('reload_weights', kwargs={'weights_path': "
                         "NEW_DIR})) before sampling resumes, and verify with compute_weight_checksums that the "
                         "engine checksum changed.")
        return " ".join(fixes) or self.fix

    def _previous_version(self, ctx: Context, evidence: list[Evidence], mode: str,
                          later: str) -> tuple[float | None, float | None] | None:
        if len(ctx.snapshot_versions()) < 2:
            return None
        base = ctx.replay_for(ReplayConfig())
        name = ctx.replay_for(ReplayConfig(requests="previous_version"))
        if name is None or base is None:
            return None
        where = (f"{later} AND request_id IN (SELECT request_id FROM replay_requests "
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
        return d_prev, d_claim


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


CAUSE = WeightSync()
