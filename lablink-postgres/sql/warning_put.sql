-- Stores a warning unless its VM has one of its kind and due time; the stored one either way
-- (the no-op update makes RETURNING give the stored row). An unknown hostname violates the
-- foreign key.
-- $1: id; $2: hostname; $3: kind; $4: email; $5: due time; $6: message; $7: created at.
INSERT INTO lablink_vm_warnings (id, hostname, kind, email, due_at, message, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (hostname, kind, due_at) DO UPDATE SET id = lablink_vm_warnings.id
RETURNING id, hostname, kind, email, due_at, message, created_at, acknowledged_at
