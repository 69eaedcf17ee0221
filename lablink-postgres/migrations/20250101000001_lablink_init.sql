-- LabLink schema: VM records, their bounded logs, and provisioning operations.
-- Every column of lablink_vms mirrors a field of lablink_core::VmRecord.

CREATE TABLE lablink_vms (
    hostname                           text COLLATE "C" PRIMARY KEY,
    instance_id                        text,
    address                            text,
    -- VmState::as_str() and, for unhealthy/rebooting, the phase to resume.
    state                              text NOT NULL CHECK (state IN (
        'requested', 'booting', 'available', 'assigned', 'unhealthy',
        'rebooting', 'failed', 'terminating', 'terminated')),
    resume                             text CHECK (resume IN ('booting', 'available', 'assigned')),
    -- The assignment: all four set, or none (set exactly while the VM is owned).
    email                              text COLLATE "C",
    crd_command                        text,
    pin                                text,
    assigned_at                        timestamptz,
    gpu_health                         text NOT NULL,
    in_use                             boolean NOT NULL,
    agent_status                       text,
    last_heartbeat                     timestamptz,
    boot_id                            text,
    restarts                           bigint NOT NULL CHECK (restarts >= 0),
    provision_start                    timestamptz,
    provision_end                      timestamptz,
    cloud_init_start                   timestamptz,
    cloud_init_end                     timestamptz,
    container_start                    timestamptz,
    container_end                      timestamptz,
    cloud_init_duration_seconds        double precision,
    container_startup_duration_seconds double precision,
    last_error                         text,
    token_digest                       bytea CHECK (octet_length(token_digest) = 32),
    generation                         bigint NOT NULL CHECK (generation >= 0),
    created_at                         timestamptz NOT NULL,
    updated_at                         timestamptz NOT NULL,
    state_changed_at                   timestamptz NOT NULL,
    CONSTRAINT lablink_vms_resume_only_when_paused
        CHECK ((state IN ('unhealthy', 'rebooting')) = (resume IS NOT NULL)),
    CONSTRAINT lablink_vms_assignment_complete
        CHECK ((email IS NULL) = (crd_command IS NULL)
           AND (email IS NULL) = (pin IS NULL)
           AND (email IS NULL) = (assigned_at IS NULL)),
    CONSTRAINT lablink_vms_assignment_only_when_owned
        CHECK ((email IS NOT NULL) = (state = 'assigned' OR resume = 'assigned'))
);

-- One email holds at most one live VM (the assignment is cleared when a VM stops being owned).
CREATE UNIQUE INDEX lablink_vms_email_key ON lablink_vms (email) WHERE email IS NOT NULL;

-- "Find an assignable VM": a small partial index, in the hostname order claims take.
CREATE INDEX lablink_vms_assignable_idx ON lablink_vms (hostname)
    WHERE state = 'available' AND gpu_health <> 'Unhealthy';

-- Agent authentication looks VMs up by token digest.
CREATE UNIQUE INDEX lablink_vms_token_digest_key ON lablink_vms (token_digest)
    WHERE token_digest IS NOT NULL;

-- Per-stream byte accounting; its row is locked while lines are appended and trimmed, so
-- concurrent appends to one stream cannot push it past its cap.
CREATE TABLE lablink_vm_log_streams (
    hostname text COLLATE "C" NOT NULL REFERENCES lablink_vms (hostname) ON DELETE CASCADE,
    stream   text NOT NULL CHECK (stream IN ('cloud_init', 'container', 'agent')),
    bytes    bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    PRIMARY KEY (hostname, stream)
);

-- One row per log line; each line counts octet_length(line) + 1 bytes (its newline).
CREATE TABLE lablink_vm_log_lines (
    hostname text COLLATE "C" NOT NULL,
    stream   text NOT NULL,
    seq      bigint GENERATED ALWAYS AS IDENTITY,
    line     text NOT NULL,
    PRIMARY KEY (hostname, stream, seq),
    FOREIGN KEY (hostname, stream)
        REFERENCES lablink_vm_log_streams (hostname, stream) ON DELETE CASCADE
);

CREATE TABLE lablink_operations (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('launch', 'destroy', 'reboot')),
    status      text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    hostnames   text[] NOT NULL,
    done        bigint NOT NULL CHECK (done >= 0),
    progress    text[] NOT NULL,
    message     text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz
);

CREATE INDEX lablink_operations_newest_idx ON lablink_operations (started_at DESC, id DESC);
