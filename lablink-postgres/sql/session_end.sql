-- Marks session $1 ended until $2; a repeat keeps the later time.
INSERT INTO lablink_ended_sessions (id, until)
VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET until = GREATEST(lablink_ended_sessions.until, EXCLUDED.until)
