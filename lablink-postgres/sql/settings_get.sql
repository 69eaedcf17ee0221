-- The workshop settings saved last, if any.
SELECT revision, pool_enabled, pool_min_available, pool_max_total, pool_idle_ttl_ms,
       destruction_times, destruction_warning_ms, updated_at, updated_by
FROM lablink_settings
