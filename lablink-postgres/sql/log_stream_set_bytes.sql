UPDATE lablink_vm_log_streams SET bytes = $3 WHERE hostname = $1 AND stream = $2
