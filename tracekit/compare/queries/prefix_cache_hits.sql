-- Recorded vs trainer for requests served partly from the prefix cache (num_cached_tokens > 0) against misses: stale KV shows up as a larger gap on hits.
SELECT cache_hit, requests, tokens, mean_delta, mean_abs_delta, clip_rate, k3
FROM diff_by_cache_hit('recorded', 'trainer');
