-- What each VM's time was spent on (lablink_core::usage): seconds by kind, accounted up to
-- usage_since at every change of the record; its instance type (a price table's key); and
-- what happened to it that its current fields no longer show (lablink_core::record::History,
-- as JSON). lablink_removed_vms keeps what an export needs of every removed VM, so removing
-- a VM loses neither who had it nor what it cost.
ALTER TABLE lablink_vms
    ADD COLUMN instance_type  text,
    ADD COLUMN usage_starting double precision NOT NULL DEFAULT 0,
    ADD COLUMN usage_free     double precision NOT NULL DEFAULT 0,
    ADD COLUMN usage_in_use   double precision NOT NULL DEFAULT 0,
    ADD COLUMN usage_idle     double precision NOT NULL DEFAULT 0,
    ADD COLUMN usage_other    double precision NOT NULL DEFAULT 0,
    ADD COLUMN usage_since    timestamptz,
    ADD COLUMN history        jsonb NOT NULL DEFAULT '{}';

-- VMs recorded before this migration count from their last change; a row inserted without
-- it (the store always sets it) from its insertion.
UPDATE lablink_vms SET usage_since = updated_at;
ALTER TABLE lablink_vms ALTER COLUMN usage_since SET NOT NULL,
    ALTER COLUMN usage_since SET DEFAULT now();

-- What is kept of each removed VM (lablink_core::RemovedVm, as JSON), with its time by kind
-- in columns for the fleet's usage; in order of removal.
CREATE TABLE lablink_removed_vms (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hostname       text NOT NULL,
    instance_type  text NOT NULL,
    usage_starting double precision NOT NULL,
    usage_free     double precision NOT NULL,
    usage_in_use   double precision NOT NULL,
    usage_idle     double precision NOT NULL,
    usage_other    double precision NOT NULL,
    vm             jsonb NOT NULL
);
