-- Every logprob source (recorded, each replay raw/processed) against the trainer: tokens compared, mean Δ and mean |Δ|.
SELECT s.source, count(*) AS tokens,
       avg(s.logprob::DOUBLE - t.logprob::DOUBLE) FILTER (WHERE isfinite(s.logprob::DOUBLE - t.logprob::DOUBLE)) AS mean_delta,
       avg(abs(s.logprob::DOUBLE - t.logprob::DOUBLE)) FILTER (WHERE isfinite(s.logprob::DOUBLE - t.logprob::DOUBLE)) AS mean_abs_delta
FROM token_sources AS s JOIN trainer AS t USING (request_id, pos)
WHERE s.source <> 'trainer' AND s.logprob IS NOT NULL
GROUP BY s.source
ORDER BY s.source;
