-- The registration token whose digest is $1, its row locked until the transaction ends:
-- registrations with one token run one at a time, so its uses never pass max_uses.
SELECT * FROM lablink_registration_tokens WHERE digest = $1 FOR UPDATE
