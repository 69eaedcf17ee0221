SELECT * FROM lablink_operations WHERE id = $1
