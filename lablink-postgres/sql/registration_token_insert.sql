-- Stores a new registration token (a duplicate id or digest is a unique violation).
INSERT INTO lablink_registration_tokens
    (id, digest, label, created_at, expires_at, max_uses, uses, revoked_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
