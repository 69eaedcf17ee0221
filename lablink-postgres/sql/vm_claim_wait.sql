-- vm_claim.sql without SKIP LOCKED, for when every assignable VM was locked by someone
-- (other claims, telemetry): it waits for the holders, and READ COMMITTED re-checks each
-- row after the wait, so it takes the first VM that is still assignable, or none.
WITH existing AS (
    SELECT * FROM lablink_vms WHERE email = $1
), picked AS (
    SELECT hostname, generation
    FROM lablink_vms
    WHERE state = 'available' AND gpu_health <> 'Unhealthy'
      AND NOT EXISTS (SELECT 1 FROM existing)
    ORDER BY hostname
    LIMIT 1
    FOR UPDATE
), claimed AS (
    UPDATE lablink_vms v SET
        state = 'assigned',
        email = $1, crd_command = $2, pin = $3, assigned_at = $4,
        in_use = false,
        state_changed_at = $4, updated_at = $4,
        generation = v.generation + 1,
        -- The free time until now, as VmRecord::apply accounts it.
        usage_free = v.usage_free + greatest(0, extract(epoch FROM ($4 - v.usage_since)))::float8,
        usage_since = greatest(v.usage_since, $4)
    FROM picked
    WHERE v.hostname = picked.hostname
      AND v.generation = picked.generation
      AND v.state = 'available'
    RETURNING v.*
)
SELECT existing.*, false AS newly_assigned FROM existing
UNION ALL
SELECT claimed.*, true AS newly_assigned FROM claimed
