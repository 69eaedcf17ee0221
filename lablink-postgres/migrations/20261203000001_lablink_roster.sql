-- The registered participants: when any row exists, only these emails may take a VM.
CREATE TABLE lablink_roster (
    email text PRIMARY KEY
);
