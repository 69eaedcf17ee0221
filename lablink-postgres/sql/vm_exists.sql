SELECT EXISTS (SELECT 1 FROM lablink_vms WHERE hostname = $1)
