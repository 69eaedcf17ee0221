-- The secret stored as $1, storing $2 first when there is none. One statement, so replicas
-- starting together agree: a conflicting insert waits for the other's commit, and the no-op
-- update makes RETURNING give the stored row.
-- $1: the name; $2: the candidate secret.
INSERT INTO lablink_shared_secrets (name, secret)
VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET secret = lablink_shared_secrets.secret
RETURNING secret
