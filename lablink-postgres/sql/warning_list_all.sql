-- Every VM's warnings, by hostname, due time and kind.
SELECT id, hostname, kind, email, due_at, message, created_at, acknowledged_at
FROM lablink_vm_warnings
ORDER BY hostname, due_at, kind COLLATE "C"
