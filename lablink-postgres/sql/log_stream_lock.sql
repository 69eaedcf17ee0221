-- Creates the stream's accounting row if needed and locks it; returns the bytes it holds.
INSERT INTO lablink_vm_log_streams (hostname, stream) VALUES ($1, $2)
ON CONFLICT (hostname, stream) DO UPDATE SET bytes = lablink_vm_log_streams.bytes
RETURNING bytes
