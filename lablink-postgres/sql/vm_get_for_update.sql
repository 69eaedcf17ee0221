SELECT * FROM lablink_vms WHERE hostname = $1 FOR UPDATE
