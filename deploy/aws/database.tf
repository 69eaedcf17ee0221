# The allocator's database. Without database_url, the host installs PostgreSQL and makes
# the password itself (it never leaves the host). With one, the URL is kept in an SSM
# SecureString parameter that only this role may read: the host fetches it at boot, so the
# URL is never in the user data (which anyone with ec2:DescribeInstanceAttribute can read).
# It is in the Terraform state, like every sensitive variable: keep the state private.

locals {
  # Whether a URL is given is no secret (it chooses resources); the URL is.
  external_database  = nonsensitive(var.database_url != "")
  database_parameter = "/${var.name}/allocator/database-url"
}

resource "aws_ssm_parameter" "database_url" {
  count       = local.external_database ? 1 : 0
  name        = local.database_parameter
  description = "[database] url of the LabLink allocator of ${var.name}"
  type        = "SecureString"
  value       = var.database_url
}
