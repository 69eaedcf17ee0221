-- Secrets every replica must share (the admin session key when none is configured): stored
-- once by whichever replica asks first, read by all the others.
CREATE TABLE lablink_shared_secrets (
    name   text PRIMARY KEY,
    secret bytea NOT NULL
);
