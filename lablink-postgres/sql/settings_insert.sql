-- The first save (made from revision 0): stored as revision 1 unless a row exists (then no
-- row is returned: someone saved first).
-- $1..$8: the settings' columns, revision excluded.
INSERT INTO lablink_settings (singleton, revision, pool_enabled, pool_min_available,
    pool_max_total, pool_idle_ttl_ms, destruction_times, destruction_warning_ms, updated_at,
    updated_by)
VALUES (true, 1, $1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (singleton) DO NOTHING
RETURNING revision, pool_enabled, pool_min_available, pool_max_total, pool_idle_ttl_ms,
    destruction_times, destruction_warning_ms, updated_at, updated_by
