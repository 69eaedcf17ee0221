-- Every removed VM, in order of removal.
SELECT vm FROM lablink_removed_vms ORDER BY seq
