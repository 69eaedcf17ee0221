INSERT INTO lablink_vm_log_lines (hostname, stream, line)
SELECT $1, $2, t.line
FROM unnest($3::text[]) WITH ORDINALITY AS t (line, n)
ORDER BY t.n
