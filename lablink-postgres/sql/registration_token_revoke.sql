-- Revokes token $1 at $2; revoking again keeps the first time. No row: no such token.
UPDATE lablink_registration_tokens SET revoked_at = COALESCE(revoked_at, $2)
WHERE id = $1
RETURNING *
