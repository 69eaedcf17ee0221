-- Appends an audit entry; an id stored already changes nothing (a retried append).
INSERT INTO lablink_audit (id, at, actor, address, action, target, detail, ok)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (id) DO NOTHING
