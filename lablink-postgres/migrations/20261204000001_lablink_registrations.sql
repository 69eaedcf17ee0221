-- Machines that join by registering themselves (lablink_core::registration): a VM row keeps
-- how it joined (VmRecord.registration; both columns NULL for a VM a provisioner created),
-- one identity holds at most one name, and the registration tokens are stored as digests,
-- each counting the machines it registered (never past max_uses).
ALTER TABLE lablink_vms
    ADD COLUMN machine_identity text,
    ADD COLUMN allow_reboot     boolean,
    ADD CONSTRAINT lablink_vms_registration_complete
        CHECK ((machine_identity IS NULL) = (allow_reboot IS NULL));

CREATE UNIQUE INDEX lablink_vms_machine_identity_key ON lablink_vms (machine_identity)
    WHERE machine_identity IS NOT NULL;

CREATE TABLE lablink_registration_tokens (
    id         uuid PRIMARY KEY,
    digest     bytea NOT NULL UNIQUE CHECK (octet_length(digest) = 32),
    label      text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    max_uses   integer CHECK (max_uses > 0),
    uses       integer NOT NULL DEFAULT 0
        CHECK (uses >= 0 AND (max_uses IS NULL OR uses <= max_uses)),
    revoked_at timestamptz
);
