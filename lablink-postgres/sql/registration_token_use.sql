-- Counts one use of token $1 (a new machine registered with it; the row is locked).
UPDATE lablink_registration_tokens SET uses = uses + 1 WHERE id = $1
