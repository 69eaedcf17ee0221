INSERT INTO lablink_vms (
    hostname, instance_id, address, state, resume,
    email, crd_command, pin, assigned_at,
    gpu_health, in_use, agent_status, last_heartbeat, boot_id, restarts,
    provision_start, provision_end, cloud_init_start, cloud_init_end,
    container_start, container_end, cloud_init_duration_seconds,
    container_startup_duration_seconds,
    last_error, token_digest, generation, created_at, updated_at, state_changed_at,
    machine_identity, allow_reboot,
    instance_type, usage_starting, usage_free, usage_in_use, usage_idle, usage_other,
    usage_since, history, desktop
) VALUES (
    $1, $2, $3, $4, $5,
    $6, $7, $8, $9,
    $10, $11, $12, $13, $14, $15,
    $16, $17, $18, $19,
    $20, $21, $22,
    $23,
    $24, $25, $26, $27, $28, $29,
    $30, $31,
    $32, $33, $34, $35, $36, $37,
    $38, $39, $40
)
ON CONFLICT (hostname) DO NOTHING
RETURNING hostname
