-- Weight updates whose engine-side checksum did not change from the previous update of the same engine: the sync did not take effect.
SELECT engine_id, version, step, t_end, method, ok, engine_checksum,
       lag(engine_checksum) OVER w AS previous_checksum,
       lag(version) OVER w AS previous_version,
       engine_checksum IS NOT NULL AND engine_checksum = lag(engine_checksum) OVER w AS unchanged
FROM weight_syncs
WINDOW w AS (PARTITION BY engine_id ORDER BY t_end NULLS FIRST, version)
ORDER BY engine_id, t_end NULLS FIRST, version;
