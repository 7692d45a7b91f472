-- Requests whose tokens span a weight update (in-flight sync): versions seen per request and how many tokens each.
SELECT t.request_id, r.step, r.weight_version_start, r.weight_version_end,
       list(DISTINCT t.weight_version ORDER BY t.weight_version) AS versions,
       count(*) AS tokens
FROM tokens AS t JOIN requests AS r USING (request_id)
GROUP BY ALL
HAVING count(DISTINCT t.weight_version) > 1 OR any_value(r.weight_version_start) IS DISTINCT FROM any_value(r.weight_version_end)
ORDER BY t.request_id
LIMIT 200;
