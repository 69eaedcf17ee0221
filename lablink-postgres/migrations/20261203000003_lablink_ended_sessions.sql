-- Signed-out admin sessions, refused by every replica until `until` (when their cookie
-- expires anyway); rows past it are deleted when the next session ends.
CREATE TABLE lablink_ended_sessions (
    id    text PRIMARY KEY,
    until timestamptz NOT NULL
);
CREATE INDEX lablink_ended_sessions_until ON lablink_ended_sessions (until);
