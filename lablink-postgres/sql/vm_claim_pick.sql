-- One assignable VM, in hostname order, skipping rows other claims hold.
SELECT *
FROM lablink_vms
WHERE state = 'available' AND gpu_health <> 'Unhealthy'
ORDER BY hostname
LIMIT 1
FOR UPDATE SKIP LOCKED
