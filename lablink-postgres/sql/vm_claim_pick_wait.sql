-- Fallback when every assignable VM was locked: wait for the holders, then take the first
-- VM that is still assignable (READ COMMITTED re-checks the condition after the wait).
SELECT *
FROM lablink_vms
WHERE state = 'available' AND gpu_health <> 'Unhealthy'
ORDER BY hostname
LIMIT 1
FOR UPDATE
