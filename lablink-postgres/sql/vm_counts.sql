SELECT state, resume, gpu_health = 'Unhealthy' AS gpu_unhealthy, count(*) AS n
FROM lablink_vms
GROUP BY 1, 2, 3
