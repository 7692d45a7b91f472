-- Sampling params the engine used differently from what the caller asked for (e.g. generation_config defaults applied silently), per field and value.
-- Fields missing from a side count as vLLM's own default; top_k <= 0 means "off" (-1).
WITH fields(field, dflt) AS (
    VALUES ('temperature', 1.0), ('top_p', 1.0), ('top_k', -1.0), ('min_p', 0.0),
           ('repetition_penalty', 1.0), ('presence_penalty', 0.0), ('frequency_penalty', 0.0)
),
params AS (
    SELECT r.request_id, r.step, r.engine_id, f.field,
           coalesce(TRY_CAST(json_extract_string(r.sampling_requested, '$.' || f.field) AS DOUBLE), f.dflt) AS requested,
           coalesce(TRY_CAST(json_extract_string(r.sampling_resolved, '$.' || f.field) AS DOUBLE), f.dflt) AS resolved
    FROM requests AS r CROSS JOIN fields AS f
    WHERE r.sampling_requested IS NOT NULL AND r.sampling_resolved IS NOT NULL
)
SELECT field,
       CASE WHEN field = 'top_k' AND requested <= 0 THEN -1 ELSE requested END AS requested,
       CASE WHEN field = 'top_k' AND resolved <= 0 THEN -1 ELSE resolved END AS resolved,
       count(*) AS requests, min(step) AS first_step, max(step) AS last_step,
       any_value(engine_id) AS engine_id
FROM params
WHERE (CASE WHEN field = 'top_k' AND requested <= 0 THEN -1 ELSE requested END)
      IS DISTINCT FROM (CASE WHEN field = 'top_k' AND resolved <= 0 THEN -1 ELSE resolved END)
GROUP BY ALL
ORDER BY requests DESC, field;
