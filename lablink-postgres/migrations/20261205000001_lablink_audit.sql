-- The audit trail of admin actions (lablink_core::audit): one row per entry, never updated.
-- `seq` keeps the order of appending, which breaks ties between entries of one instant; the
-- log is read newest first by (at, seq), a page at a time from an entry (by id).
CREATE TABLE lablink_audit (
    seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id      uuid NOT NULL UNIQUE,
    at      timestamptz NOT NULL,
    actor   text NOT NULL,
    address text,
    action  text NOT NULL,
    target  text,
    detail  text,
    ok      boolean NOT NULL
);

CREATE INDEX lablink_audit_at_idx ON lablink_audit (at DESC, seq DESC);
