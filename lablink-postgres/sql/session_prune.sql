-- Forgets the ended sessions whose time passed by $1 (their cookies have expired).
DELETE FROM lablink_ended_sessions WHERE until <= $1
