-- Removes warnings by id.
DELETE FROM lablink_vm_warnings WHERE id = ANY ($1::uuid[])
