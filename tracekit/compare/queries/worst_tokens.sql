-- The 50 tokens where the recorded engine and the trainer disagree most (|Δ|), with their request context.
SELECT d.request_id, d.pos, d.step, d.weight_version, d.sampling, d.cache_hit,
       d.logprob_a AS recorded, d.logprob_b AS trainer, d.delta, d.ratio
FROM token_diff('recorded', 'trainer') AS d
ORDER BY CASE WHEN isnan(d.delta) THEN -1 ELSE abs(d.delta) END DESC
LIMIT 50;
