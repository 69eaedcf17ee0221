# The allocator's own host. Required: ami, subnet_id, release_url, release_sha256 and
# lablink_toml; everything else has a default.

variable "name" {
  description = "Names the resources (\"<name>-allocator\", ...) and tags them deployment=<name>."
  type        = string
  default     = "lablink"
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}$", var.name))
    error_message = "name: lowercase letters, digits and dashes, at most 31 characters."
  }
}

variable "region" {
  description = "AWS region of the allocator host."
  type        = string
  default     = "us-west-2"
  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]+$", var.region))
    error_message = "region: an AWS region name such as us-west-2."
  }
}

variable "ami" {
  description = "AMI of the host: Debian 12 or Ubuntu 22.04/24.04 (amd64, matching the release's target). tls = \"caddy\" needs Debian 12 or Ubuntu 24.04 (their archives have caddy)."
  type        = string
}

variable "instance_type" {
  description = "EC2 instance type of the allocator host."
  type        = string
  default     = "t3.small"
}

variable "subnet_id" {
  description = "Subnet of the host (a public one: the Elastic IP needs an internet gateway). Its VPC holds the security group."
  type        = string
}

variable "key_name" {
  description = "An existing EC2 key pair for SSH (empty: none). SSH also needs ssh_cidr_blocks."
  type        = string
  default     = ""
}

variable "root_volume_gb" {
  description = "Size of the encrypted gp3 root volume, in GB."
  type        = number
  default     = 20
  validation {
    condition     = var.root_volume_gb >= 8
    error_message = "root_volume_gb: at least 8."
  }
}

variable "http_cidr_blocks" {
  description = "Who may reach ports 443 and 80."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "ssh_cidr_blocks" {
  description = "Who may reach port 22 (default: nobody)."
  type        = list(string)
  default     = []
}

variable "provisioner" {
  description = "What the allocator creates client VMs with, which decides its IAM policy: \"aws\" (the EC2 API), \"terraform\" (the shipped client module) or \"none\" (local/fake: no EC2 rights)."
  type        = string
  default     = "aws"
  validation {
    condition     = contains(["aws", "terraform", "none"], var.provisioner)
    error_message = "provisioner: \"aws\", \"terraform\" or \"none\"."
  }
}

variable "client_deployment" {
  description = "The deployment name of the client VMs ([provisioner] deployment; empty: name). The allocator may reboot, terminate, tag and change only EC2 resources tagged deployment=<it> (and ManagedBy of its provisioner), and with provisioner = \"terraform\" only the IAM role and instance profile named <it>-lablink-client-*."
  type        = string
  default     = ""
  validation {
    condition     = var.client_deployment == "" || can(regex("^[A-Za-z0-9._-]{1,64}$", var.client_deployment))
    error_message = "client_deployment: 1 to 64 letters, digits, '.', '_' or '-', or empty (name)."
  }
}

variable "client_role_arn" {
  description = "provisioner = \"aws\": the ARN of the role in the client VMs' instance profile ([provisioner] instance_profile), which the allocator may pass (empty: VMs without a profile, no iam:PassRole)."
  type        = string
  default     = ""
  validation {
    condition     = var.client_role_arn == "" || can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$", var.client_role_arn))
    error_message = "client_role_arn: an IAM role ARN (arn:aws:iam::<account>:role/<name>) or empty."
  }
}

variable "state_bucket" {
  description = "provisioner = \"terraform\": the S3 bucket of the client module's state ([provisioner.state] bucket; empty: local state, no S3 rights)."
  type        = string
  default     = ""
}

variable "state_key" {
  description = "provisioner = \"terraform\": the state's key in state_bucket ([provisioner.state] key); its lock file is <key>.tflock."
  type        = string
  default     = "lablink/terraform.tfstate"
}

variable "artifact_bucket" {
  description = "The S3 bucket of [collect.store] kind = \"s3\" (empty: no S3 rights for collections)."
  type        = string
  default     = ""
}

variable "artifact_prefix" {
  description = "The [collect.store] prefix: the allocator's object rights are limited to keys under it (empty: the whole bucket)."
  type        = string
  default     = ""
}

variable "zone_id" {
  description = "Route53 hosted zone for an A record of domain_name to the Elastic IP (empty: no record)."
  type        = string
  default     = ""
}

variable "domain_name" {
  description = "The allocator's host name (e.g. lablink.example.org): the Caddy site, the A record, the URL output. Empty: the URL uses the Elastic IP."
  type        = string
  default     = ""
  validation {
    condition     = var.domain_name == "" || can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.domain_name))
    error_message = "domain_name: a lowercase DNS name such as lablink.example.org, or empty."
  }
}

variable "release_url" {
  description = "URL of the allocator's release tarball (lablink-<version>-<target>.tar.gz from scripts/release.sh)."
  type        = string
  validation {
    condition     = can(regex("^https?://[^[:space:]]+$", var.release_url))
    error_message = "release_url: an http(s) URL without spaces."
  }
}

variable "release_sha256" {
  description = "SHA-256 of the release tarball (its line in SHA256SUMS). The host installs nothing when it differs."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-fA-F]{64}$", var.release_sha256))
    error_message = "release_sha256: 64 hexadecimal digits."
  }
}

variable "lablink_toml" {
  description = "The allocator's configuration. It is kept in an SSM SecureString parameter /<name>/allocator/lablink-toml that only this role may read (never in the user data), and written at boot as /etc/lablink/lablink.toml (root:lablink 0640). [server] listen/trusted_proxies, [server.tls] cert_file/key_file (tls = \"builtin\") and [database] url are set by this module (LABLINK_* variables in a systemd drop-in) and override the file's. At most 8,000 bytes (an SSM parameter holds 8 KB): leave comments out."
  type        = string
  sensitive   = true
  validation {
    # base64 is 4 characters per 3 bytes of UTF-8: an upper bound of the size in bytes.
    condition     = ceil(length(base64encode(var.lablink_toml)) / 4) * 3 <= 8000
    error_message = "lablink_toml: at most 8,000 bytes (it is kept in an SSM parameter, which holds 8 KB): leave comments out."
  }
}

variable "database_url" {
  description = "An existing PostgreSQL database (postgres://...). Empty: PostgreSQL is installed on the host, with a password made there. Given, it is stored as an SSM SecureString parameter that the host reads at boot, never in the user data. No spaces, quotes or backslashes (percent-encode them)."
  type        = string
  default     = ""
  sensitive   = true
  validation {
    condition     = var.database_url == "" || can(regex("^postgres(ql)?://[^[:space:]'\"\\\\]+$", var.database_url))
    error_message = "database_url: a postgres:// URL without spaces, quotes or backslashes, or empty."
  }
}

variable "tls" {
  description = "Who serves HTTPS: \"caddy\" (Caddy with an automatic certificate for domain_name, proxying to the allocator on 127.0.0.1:8080), \"builtin\" (the allocator on :443 with the certificate tls_cert_file and key tls_key_file, which you provide) or \"none\" (plain HTTP on :80)."
  type        = string
  default     = "caddy"
  validation {
    condition     = contains(["caddy", "builtin", "none"], var.tls)
    error_message = "tls: \"caddy\", \"builtin\" or \"none\"."
  }
}

variable "tls_cert_file" {
  description = "tls = \"builtin\": the certificate chain on the host, readable by the user lablink (set as LABLINK_SERVER__TLS__CERT_FILE, which overrides lablink_toml's [server.tls] cert_file)."
  type        = string
  default     = "/etc/lablink/tls/fullchain.pem"
  validation {
    condition     = can(regex("^/[A-Za-z0-9._/-]+$", var.tls_cert_file))
    error_message = "tls_cert_file: an absolute path of letters, digits, '.', '_', '-' and '/'."
  }
}

variable "tls_key_file" {
  description = "tls = \"builtin\": the private key on the host, readable by the user lablink (set as LABLINK_SERVER__TLS__KEY_FILE, which overrides lablink_toml's [server.tls] key_file)."
  type        = string
  default     = "/etc/lablink/tls/privkey.pem"
  validation {
    condition     = can(regex("^/[A-Za-z0-9._/-]+$", var.tls_key_file))
    error_message = "tls_key_file: an absolute path of letters, digits, '.', '_', '-' and '/'."
  }
}

variable "tags" {
  description = "More tags on every resource."
  type        = map(string)
  default     = {}
}
