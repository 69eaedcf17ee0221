SELECT * FROM lablink_vms WHERE email = $1
