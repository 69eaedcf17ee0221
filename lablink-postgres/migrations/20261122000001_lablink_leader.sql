-- The supervisor leader lease: at most one row, held by one replica until `expires_at`.
CREATE TABLE lablink_leader (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL
);
