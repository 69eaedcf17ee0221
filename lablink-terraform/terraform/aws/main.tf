# One EC2 instance per entry of `var.vms` (for_each keyed by hostname), plus the resources they
# share while there is at least one: a security group, an instance profile and, when a public
# key is given, an SSH key pair. With no VM left, nothing is left.
#
# Existing instances are never replaced or restarted by a later apply: their token never
# changes (the provisioner keeps it), and changes of user data or of the AMI (a newer AMI
# matched by the lookup, a new allocator_url) only apply to instances created afterwards.

locals {
  prefix    = var.resource_prefix != "" ? var.resource_prefix : "${var.deployment}-lablink-client"
  hostnames = nonsensitive(toset(keys(var.vms)))
  shared    = length(local.hostnames) > 0 ? 1 : 0

  common_tags = merge(var.extra_tags, {
    deployment = var.deployment
    ManagedBy  = "lablink-terraform"
  })

  # The agent's settings, under the names it reads, as "NAME base64(value)" lines for the
  # user data (empty settings are left out).
  agent_env = join("\n", [for name, value in {
    SUBJECT_IMAGE          = var.image_name
    TUTORIAL_REPO_TO_CLONE = var.repository
    LABLINK_STARTUP_SCRIPT = var.startup_script
    STARTUP_ON_ERROR       = var.startup_on_error
    LABLINK_CRD_USER       = var.desktop_user
    LABLINK_INUSE_PROCESS  = var.inuse_process
    LABLINK_LOG_FILES      = join(",", var.log_files)
    GPU_SUPPORT            = var.gpu_support ? "true" : ""
  } : "${name} ${base64encode(value)}" if trimspace(value) != ""])

  # Each VM's start-up script, from the template the EC2 provisioner shares: its own row (its
  # token in base64) and the agent's settings.
  user_data = { for hostname in local.hostnames : hostname => templatefile("${path.module}/user_data.sh.tftpl", {
    pad_tag                = ""
    rows                   = "0 ${hostname} ${base64encode(var.vms[hostname].token)}\n"
    allocator_url_b64      = base64encode(var.allocator_url)
    agent_download_url_b64 = base64encode(var.agent_download_url)
    agent_sha256           = lower(var.agent_sha256)
    agent_env              = local.agent_env
  }) }

  ami_id = (var.client_ami_id != "" ? var.client_ami_id
    : var.gpu_support ? one(data.aws_ami.gpu[*].id)
  : one(data.aws_ami.ubuntu[*].id))
}

data "aws_ami" "ubuntu" {
  count       = var.client_ami_id == "" && !var.gpu_support ? local.shared : 0
  most_recent = true
  owners      = ["099720109477"] # Canonical

  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*"]
  }
}

data "aws_ami" "gpu" {
  count       = var.client_ami_id == "" && var.gpu_support ? local.shared : 0
  most_recent = true
  owners      = ["amazon"]

  filter {
    name   = "name"
    values = ["Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"]
  }
}

data "aws_vpc" "default" {
  count   = var.vpc_id == "" ? local.shared : 0
  default = true
}

resource "aws_security_group" "client" {
  count       = local.shared
  name        = "${local.prefix}-sg"
  description = "LabLink client VMs of ${var.deployment}"
  vpc_id      = var.vpc_id != "" ? var.vpc_id : data.aws_vpc.default[0].id

  dynamic "ingress" {
    for_each = length(var.ssh_cidr_blocks) > 0 ? [1] : []
    content {
      description = "SSH"
      from_port   = 22
      to_port     = 22
      protocol    = "tcp"
      cidr_blocks = var.ssh_cidr_blocks
    }
  }

  egress {
    description = "Everything (the agent calls the allocator; the VM pulls software)"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }

  tags = { Name = "${local.prefix}-sg" }
}

resource "aws_iam_role" "client" {
  count = local.shared
  name  = "${local.prefix}-vm-role"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_instance_profile" "client" {
  count = local.shared
  name  = "${local.prefix}-instance-profile"
  role  = aws_iam_role.client[0].name
}

resource "aws_key_pair" "client" {
  count      = var.ssh_public_key != "" ? local.shared : 0
  key_name   = "${local.prefix}-keypair"
  public_key = var.ssh_public_key
}

# When the apply that creates each VM started (kept: later applies do not move it).
resource "terraform_data" "start" {
  for_each = local.hostnames
  input    = timestamp()

  lifecycle {
    ignore_changes = [input]
  }
}

resource "aws_instance" "vm" {
  for_each = local.hostnames

  ami                    = local.ami_id
  instance_type          = var.machine_type
  subnet_id              = var.subnet_id != "" ? var.subnet_id : null
  vpc_security_group_ids = [aws_security_group.client[0].id]
  key_name               = var.ssh_public_key != "" ? aws_key_pair.client[0].key_name : null
  iam_instance_profile   = aws_iam_instance_profile.client[0].name

  user_data_base64 = base64gzip(local.user_data[each.key])

  metadata_options {
    http_tokens = "required"
  }

  root_block_device {
    volume_size = var.root_volume_gb
    volume_type = "gp3"
    encrypted   = true
  }

  tags = {
    Name              = each.key
    hostname          = each.key
    LaunchRequestedAt = terraform_data.start[each.key].output
  }

  lifecycle {
    ignore_changes = [ami, user_data_base64, tags["LaunchRequestedAt"]]
  }
}

# When each VM's creation finished (a new instance makes a new end).
resource "terraform_data" "end" {
  for_each         = local.hostnames
  input            = timestamp()
  triggers_replace = [aws_instance.vm[each.key].id]

  lifecycle {
    ignore_changes = [input]
  }
}
