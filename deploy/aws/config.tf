# The allocator's configuration (lablink_toml: it can hold the cookie and session secrets,
# the metrics token, access codes and the admin password hash). Like a given database URL
# (database.tf), it is kept in an SSM SecureString parameter that only this role may read, and
# the host fetches it at boot: it is never in the user data, which anyone with
# ec2:DescribeInstanceAttribute (or any process on the host, through IMDS) can read.

locals {
  config_parameter = "/${var.name}/allocator/lablink-toml"

  # The header keeps the value non-empty (SSM refuses an empty one) and says where it is from.
  stored_lablink_toml = "# Written at boot by deploy/aws from the SSM parameter ${local.config_parameter}.\n${var.lablink_toml}"

  # Standard parameters hold 4 KB, advanced ones 8 KB (variables.tf refuses more). base64 is
  # 4 characters per 3 bytes of UTF-8: an upper bound of the size in bytes.
  config_bytes = nonsensitive(ceil(length(base64encode(local.stored_lablink_toml)) / 4) * 3)
}

resource "aws_ssm_parameter" "lablink_toml" {
  name        = local.config_parameter
  description = "lablink.toml of the LabLink allocator of ${var.name}"
  type        = "SecureString"
  tier        = local.config_bytes > 4096 ? "Advanced" : "Standard"
  value       = local.stored_lablink_toml
}
