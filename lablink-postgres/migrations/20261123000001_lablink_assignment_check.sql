-- lablink_vms_assignment_only_when_owned compared with `resume = 'assigned'`, which is NULL
-- for a VM that is not paused, so the whole CHECK was NULL (passed) for every unpaused VM
-- that is not assigned: a requested or available VM could be stored with an email, a Chrome
-- Remote Desktop command and a PIN. IS NOT DISTINCT FROM keeps the comparison two-valued.
ALTER TABLE lablink_vms
    DROP CONSTRAINT lablink_vms_assignment_only_when_owned,
    ADD CONSTRAINT lablink_vms_assignment_only_when_owned
        CHECK ((email IS NOT NULL) = (state = 'assigned' OR resume IS NOT DISTINCT FROM 'assigned'));
