-- The warnings of VM $1, by due time and kind.
SELECT id, hostname, kind, email, due_at, message, created_at, acknowledged_at
FROM lablink_vm_warnings
WHERE hostname = $1
ORDER BY due_at, kind COLLATE "C"
