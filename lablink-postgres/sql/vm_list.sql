-- $1: state kinds (empty: any), $2: owner email (NULL: any), $3: limit (NULL: none).
SELECT *
FROM lablink_vms
WHERE (cardinality($1::text[]) = 0 OR state = ANY ($1::text[]))
  AND ($2::text IS NULL OR email = $2::text)
ORDER BY hostname
LIMIT $3::bigint
