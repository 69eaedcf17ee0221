-- The newest $1 audit entries older than entry $2 (all when $2 is NULL; none when no entry
-- has that id: the row comparison with NULL is never true), newest first.
SELECT id, at, actor, address, action, target, detail, ok
FROM lablink_audit
WHERE $2::uuid IS NULL
   OR (at, seq) < (SELECT a.at, a.seq FROM lablink_audit a WHERE a.id = $2)
ORDER BY at DESC, seq DESC
LIMIT $1
