SELECT email FROM lablink_roster ORDER BY email
