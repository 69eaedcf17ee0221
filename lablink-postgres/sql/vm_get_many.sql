SELECT * FROM lablink_vms WHERE hostname = ANY($1)
