-- Numerics-relevant settings of every recording engine: dtype, lm_head dtype, logprobs_mode, prefix caching, async scheduling, generation_config.
SELECT engine_id, role, surface, vllm_version, dtype, head_dtype, logprobs_mode, enable_prefix_caching, block_size,
       async_scheduling, json_extract_string(generation_config, '$.mode') AS generation_config_mode,
       default_sampling_params
FROM engines
ORDER BY created_at;
