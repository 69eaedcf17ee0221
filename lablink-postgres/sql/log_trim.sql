-- Drops the oldest lines of a stream until at least $3 bytes are gone; returns the bytes
-- dropped. A line is dropped when the lines before it add up to less than $3.
WITH ordered AS (
    SELECT seq,
           octet_length(line) + 1 AS size,
           sum(octet_length(line) + 1) OVER (ORDER BY seq) AS upto
    FROM lablink_vm_log_lines
    WHERE hostname = $1 AND stream = $2
), dropped AS (
    DELETE FROM lablink_vm_log_lines l
    USING ordered o
    WHERE l.hostname = $1 AND l.stream = $2 AND l.seq = o.seq AND o.upto - o.size < $3
    RETURNING o.size
)
SELECT COALESCE(sum(size), 0)::bigint FROM dropped
