SELECT stream, string_agg(line, E'\n' ORDER BY seq) AS text
FROM lablink_vm_log_lines
WHERE hostname = $1
GROUP BY stream
