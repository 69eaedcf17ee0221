SELECT * FROM lablink_vms WHERE token_digest = $1
