-- Removes records $1 (lablink_removed_vms keeps what is left of them, written in the same
-- transaction).
DELETE FROM lablink_vms WHERE hostname = ANY ($1::text[]) RETURNING *
