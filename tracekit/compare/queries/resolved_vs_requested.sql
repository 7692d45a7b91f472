-- Sampling params the engine resolved differently from what the caller asked for (generation_config defaults applied silently).
SELECT r.request_id, r.step, e.model,
       r.sampling_requested, r.sampling_resolved
FROM requests r LEFT JOIN engines e USING (engine_id)
WHERE r.sampling_requested IS NOT NULL
  AND r.sampling_resolved IS NOT NULL
  AND EXISTS (
      SELECT 1 FROM (SELECT unnest(json_keys(r.sampling_requested::JSON)) AS k)
      WHERE json_extract(r.sampling_requested::JSON, '$.' || k) IS DISTINCT FROM json_extract(r.sampling_resolved::JSON, '$.' || k)
  ) OR (r.sampling_resolved IS NOT NULL AND r.sampling_requested IS NULL)
ORDER BY r.request_id
LIMIT 200;
