-- Recorded engine vs trainer per RL step: token clip rate at eps 0.2, GSPO sequence clip rate, KL k1/k3, mean |Δ| (what drives the curves).
SELECT step, requests, tokens, clip_rate, seq_clip_rate, k1, k3, mean_abs_delta, max_abs_delta, nonfinite_tokens
FROM diff_by_step('recorded', 'trainer', eps := 0.2);
