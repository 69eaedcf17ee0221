-- Every registration token, newest first.
SELECT * FROM lablink_registration_tokens ORDER BY created_at DESC, id DESC
