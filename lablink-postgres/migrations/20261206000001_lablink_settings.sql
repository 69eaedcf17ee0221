-- The workshop settings admins change at run time (lablink_core::settings): at most one row,
-- replaced only by a save made from its revision. Durations in milliseconds.
CREATE TABLE lablink_settings (
    singleton              boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    revision               bigint NOT NULL CHECK (revision > 0),
    pool_enabled           boolean NOT NULL,
    pool_min_available     bigint NOT NULL CHECK (pool_min_available >= 0),
    pool_max_total         bigint NOT NULL CHECK (pool_max_total >= 0),
    pool_idle_ttl_ms       bigint NOT NULL CHECK (pool_idle_ttl_ms >= 0),
    destruction_times      timestamptz[] NOT NULL,
    destruction_warning_ms bigint NOT NULL CHECK (destruction_warning_ms >= 0),
    updated_at             timestamptz,
    updated_by             text
);

-- Warnings to participants (lablink_core::warning): at most one per VM, kind and due time;
-- a VM's go with it.
CREATE TABLE lablink_vm_warnings (
    id              uuid PRIMARY KEY,
    hostname        text COLLATE "C" NOT NULL REFERENCES lablink_vms (hostname) ON DELETE CASCADE,
    kind            text NOT NULL,
    email           text NOT NULL,
    due_at          timestamptz NOT NULL,
    message         text NOT NULL,
    created_at      timestamptz NOT NULL,
    acknowledged_at timestamptz,
    UNIQUE (hostname, kind, due_at)
);
