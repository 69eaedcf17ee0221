-- The participant's desktop (lablink_core::desktop): a browser desktop has no Chrome Remote
-- Desktop command, so an assignment may hold none; each assignment records how far starting
-- its desktop got (DesktopSession, as JSON; NULL for an assignment nothing happened to yet:
-- attempt 1, "assigned" at assigned_at); and a released VM may be 'resetting' (its agent
-- restores it before it is free again).
ALTER TABLE lablink_vms
    ADD COLUMN desktop jsonb,
    DROP CONSTRAINT lablink_vms_assignment_complete,
    ADD CONSTRAINT lablink_vms_assignment_complete
        CHECK ((email IS NULL) = (pin IS NULL)
           AND (email IS NULL) = (assigned_at IS NULL)
           AND (email IS NOT NULL OR crd_command IS NULL)
           AND (email IS NOT NULL OR desktop IS NULL)),
    DROP CONSTRAINT lablink_vms_state_check,
    ADD CONSTRAINT lablink_vms_state_check CHECK (state IN (
        'requested', 'booting', 'available', 'assigned', 'resetting', 'unhealthy',
        'rebooting', 'failed', 'terminating', 'terminated'));
