-- Records that VM $1's agent showed warning $2 at $3 (a repeat keeps the first time).
UPDATE lablink_vm_warnings
SET acknowledged_at = COALESCE(acknowledged_at, $3)
WHERE hostname = $1 AND id = $2
RETURNING id, hostname, kind, email, due_at, message, created_at, acknowledged_at
