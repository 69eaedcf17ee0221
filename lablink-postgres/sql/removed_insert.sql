-- Keeps removed VMs: $1 hostnames, $2 instance types ('' for none), $3..$7 seconds by kind
-- (starting, free, in use, idle, other), $8 lablink_core::RemovedVm as JSON; one element
-- per VM.
INSERT INTO lablink_removed_vms (
    hostname, instance_type, usage_starting, usage_free, usage_in_use, usage_idle,
    usage_other, vm
)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::float8[], $4::float8[], $5::float8[], $6::float8[],
    $7::float8[], $8::jsonb[]
)
