-- Drops the oldest lines of a stream until at least $3 bytes are gone; returns the bytes
-- dropped. The lines to drop are a prefix: every line whose predecessors add up to less
-- than $3. The cut-off is computed once, then the prefix is deleted by key range.
WITH cut AS MATERIALIZED (
    SELECT max(seq) AS last_seq
    FROM (
        SELECT seq,
               sum(octet_length(line) + 1) OVER (ORDER BY seq) - (octet_length(line) + 1)
                   AS bytes_before
        FROM lablink_vm_log_lines
        WHERE hostname = $1 AND stream = $2
    ) lines
    WHERE bytes_before < $3
), dropped AS (
    DELETE FROM lablink_vm_log_lines
    WHERE hostname = $1 AND stream = $2 AND seq <= (SELECT last_seq FROM cut)
    RETURNING octet_length(line) + 1 AS size
)
SELECT COALESCE(sum(size), 0)::bigint FROM dropped
