-- The fleet's seconds by kind and instance type up to $1 (lablink_core::usage): each
-- record's accounted time plus, for the kind it is in now, the time since usage_since (as
-- VmRecord::usage_at computes it), and the time of removed VMs.
WITH live AS (
    SELECT coalesce(instance_type, '') AS instance_type, state, in_use,
        usage_starting, usage_free, usage_in_use, usage_idle, usage_other,
        greatest(0, extract(epoch FROM ($1 - usage_since)))::float8 AS since
    FROM lablink_vms
), all_vms AS (
    SELECT instance_type,
        usage_starting + CASE WHEN state IN ('requested', 'booting', 'resetting') THEN since ELSE 0 END AS starting,
        usage_free + CASE WHEN state = 'available' THEN since ELSE 0 END AS free,
        usage_in_use + CASE WHEN state = 'assigned' AND in_use THEN since ELSE 0 END AS in_use,
        usage_idle + CASE WHEN state = 'assigned' AND NOT in_use THEN since ELSE 0 END AS idle,
        usage_other + CASE WHEN state IN ('unhealthy', 'rebooting', 'failed', 'terminating')
            THEN since ELSE 0 END AS other
    FROM live
    UNION ALL
    SELECT instance_type, usage_starting, usage_free, usage_in_use, usage_idle, usage_other
    FROM lablink_removed_vms
)
SELECT instance_type AS "instance_type!", sum(starting) AS "starting!", sum(free) AS "free!",
    sum(in_use) AS "in_use!", sum(idle) AS "idle!", sum(other) AS "other!"
FROM all_vms GROUP BY instance_type
