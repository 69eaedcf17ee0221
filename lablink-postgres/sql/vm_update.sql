-- Writes a record computed in Rust by VmRecord::apply / apply_telemetry (or
-- registration::renewed); $40 is the generation it was computed from (optimistic check).
UPDATE lablink_vms SET
    instance_id = $2, address = $3, state = $4, resume = $5,
    email = $6, crd_command = $7, pin = $8, assigned_at = $9,
    gpu_health = $10, in_use = $11, agent_status = $12, last_heartbeat = $13, boot_id = $14,
    restarts = $15,
    provision_start = $16, provision_end = $17, cloud_init_start = $18, cloud_init_end = $19,
    container_start = $20, container_end = $21, cloud_init_duration_seconds = $22,
    container_startup_duration_seconds = $23,
    last_error = $24, token_digest = $25, generation = $26, created_at = $27,
    updated_at = $28, state_changed_at = $29,
    machine_identity = $30, allow_reboot = $31,
    instance_type = $32, usage_starting = $33, usage_free = $34, usage_in_use = $35,
    usage_idle = $36, usage_other = $37, usage_since = $38, history = $39, desktop = $41
WHERE hostname = $1 AND generation = $40
