SELECT * FROM lablink_operations ORDER BY started_at DESC, id DESC LIMIT $1
