-- Requests, tokens and mean recorded logprob per RL step.
SELECT r.step,
       count(DISTINCT r.request_id) AS requests,
       count(*)                     AS tokens,
       avg(t.logprob)               AS mean_logprob
FROM tokens t JOIN requests r USING (request_id)
GROUP BY r.step
ORDER BY r.step;
