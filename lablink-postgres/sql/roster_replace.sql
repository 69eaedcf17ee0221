-- Adds emails to the roster (`replace_roster` clears it first, in the same transaction).
-- $1: the emails (duplicates count once).
INSERT INTO lablink_roster (email)
SELECT DISTINCT e FROM unnest($1::text[]) AS e
