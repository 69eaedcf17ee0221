-- A save made from revision $9: stored as revision $9 + 1 if $9 is the stored revision (else
-- no row is returned: someone saved since).
-- $1..$8: the settings' columns, revision excluded; $9: the expected revision.
UPDATE lablink_settings
SET revision = revision + 1, pool_enabled = $1, pool_min_available = $2, pool_max_total = $3,
    pool_idle_ttl_ms = $4, destruction_times = $5, destruction_warning_ms = $6,
    updated_at = $7, updated_by = $8
WHERE revision = $9
RETURNING revision, pool_enabled, pool_min_available, pool_max_total, pool_idle_ttl_ms,
    destruction_times, destruction_warning_ms, updated_at, updated_by
