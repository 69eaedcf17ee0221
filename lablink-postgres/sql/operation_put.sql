INSERT INTO lablink_operations
    (id, kind, status, hostnames, done, progress, message, started_at, finished_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO UPDATE SET
    kind = EXCLUDED.kind, status = EXCLUDED.status, hostnames = EXCLUDED.hostnames,
    done = EXCLUDED.done, progress = EXCLUDED.progress, message = EXCLUDED.message,
    started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at
