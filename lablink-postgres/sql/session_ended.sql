-- Whether session $1 is marked ended at $2 (one primary-key lookup).
SELECT EXISTS (
    SELECT 1 FROM lablink_ended_sessions WHERE id = $1 AND until > $2
) AS "ended!"
