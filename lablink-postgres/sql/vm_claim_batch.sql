-- Several claims in one statement (concurrent claims of one process, grouped). $1 emails
-- (distinct), $2 CRD commands, $3 PINs, $4 times, one element per claim; the result's `n` is
-- the claim's 1-based position in the arrays.
--
-- Per claim, what vm_claim.sql does: the email's VM if it holds one (unchanged,
-- newly_assigned = false); else one assignable VM (hostname order, FOR UPDATE SKIP LOCKED),
-- moved to `assigned` exactly as VmRecord::apply(Claim) does it. Claims left without a row
-- (no free VM, or the free ones are locked) are retried one by one with vm_claim.sql.
WITH req AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
        WITH ORDINALITY AS r (email, crd_command, pin, at, n)
), existing AS (
    SELECT req.n, v.*
    FROM req JOIN lablink_vms v ON v.email = req.email
), need AS (
    SELECT req.*, row_number() OVER (ORDER BY req.n) AS k
    FROM req
    WHERE NOT EXISTS (SELECT 1 FROM existing WHERE existing.n = req.n)
), picked AS (
    SELECT hostname, generation, row_number() OVER (ORDER BY hostname) AS k
    FROM (
        SELECT hostname, generation
        FROM lablink_vms
        WHERE state = 'available' AND gpu_health <> 'Unhealthy'
        ORDER BY hostname
        LIMIT (SELECT count(*) FROM need)
        FOR UPDATE SKIP LOCKED
    ) free
), claimed AS (
    UPDATE lablink_vms v SET
        state = 'assigned',
        email = need.email, crd_command = need.crd_command, pin = need.pin,
        assigned_at = need.at,
        in_use = false,
        state_changed_at = need.at, updated_at = need.at,
        generation = v.generation + 1,
        -- The free time until now, as VmRecord::apply accounts it.
        usage_free = v.usage_free + greatest(0, extract(epoch FROM (need.at - v.usage_since)))::float8,
        usage_since = greatest(v.usage_since, need.at)
    FROM need JOIN picked ON picked.k = need.k
    WHERE v.hostname = picked.hostname
      AND v.generation = picked.generation
      AND v.state = 'available'
    RETURNING need.n, v.*
)
SELECT existing.*, false AS newly_assigned FROM existing
UNION ALL
SELECT claimed.*, true AS newly_assigned FROM claimed
