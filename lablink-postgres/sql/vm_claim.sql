-- A claim in one statement. $1 email, $2 CRD command, $3 PIN, $4 now.
--
-- If $1 already holds a VM, that row comes back unchanged (newly_assigned = false).
-- Otherwise one assignable VM, in hostname order, skipping rows other transactions hold
-- (FOR UPDATE SKIP LOCKED), is moved to `assigned` exactly as VmRecord::apply(Claim) does it:
-- state 'assigned', the assignment set, in_use false, state_changed_at = updated_at = now,
-- generation + 1; the UPDATE re-checks the generation it picked (optimistic check) and the
-- state. A concurrent claim for the same email fails on lablink_vms_email_key and is retried.
-- No row: no VM is free, or every free one is locked (the caller retries with
-- vm_claim_wait.sql, which waits for the lockers instead of skipping them).
WITH existing AS (
    SELECT * FROM lablink_vms WHERE email = $1
), picked AS (
    SELECT hostname, generation
    FROM lablink_vms
    WHERE state = 'available' AND gpu_health <> 'Unhealthy'
      AND NOT EXISTS (SELECT 1 FROM existing)
    ORDER BY hostname
    LIMIT 1
    FOR UPDATE SKIP LOCKED
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
