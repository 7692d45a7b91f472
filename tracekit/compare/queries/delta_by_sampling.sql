-- Recorded vs trainer by sampling params (temperature, top-p, top-k, min-p): a logprob-mode mismatch grows as T leaves 1 or truncation bites.
SELECT sampling, requests, tokens, mean_delta, mean_abs_delta, clip_rate, k3
FROM diff_by_sampling('recorded', 'trainer');
