-- The record of the machine that registered with identity $1.
SELECT * FROM lablink_vms WHERE machine_identity = $1
