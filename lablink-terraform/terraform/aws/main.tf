# One EC2 instance per entry of `var.vms` (for_each keyed by hostname), plus the resources they
# share: a security group, an SSH key pair and an instance profile.
#
# Existing instances are never replaced or restarted by a later apply: their token never
# changes (the provisioner keeps it), and changes of user data or of the AMI (a newer AMI
# matched by the lookup, a new allocator_url) only apply to instances created afterwards.

locals {
  prefix    = var.resource_prefix != "" ? var.resource_prefix : "${var.deployment}-lablink-client"
  hostnames = nonsensitive(toset(keys(var.vms)))

  common_tags = merge(var.extra_tags, {
    deployment = var.deployment
    ManagedBy  = "lablink-terraform"
  })

  ami_id = (var.client_ami_id != "" ? var.client_ami_id
    : var.gpu_support ? data.aws_ami.gpu[0].id
  : data.aws_ami.ubuntu[0].id)
}

data "aws_ami" "ubuntu" {
  count       = var.client_ami_id == "" && !var.gpu_support ? 1 : 0
  most_recent = true
  owners      = ["099720109477"] # Canonical

  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*"]
  }
}

data "aws_ami" "gpu" {
  count       = var.client_ami_id == "" && var.gpu_support ? 1 : 0
  most_recent = true
  owners      = ["amazon"]

  filter {
    name   = "name"
    values = ["Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu 22.04) *"]
  }
}

data "aws_vpc" "default" {
  count   = var.vpc_id == "" ? 1 : 0
  default = true
}

resource "aws_security_group" "client" {
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
  name = "${local.prefix}-vm-role"
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
  name = "${local.prefix}-instance-profile"
  role = aws_iam_role.client.name
}

resource "tls_private_key" "client" {
  algorithm = "RSA"
  rsa_bits  = 4096
}

resource "aws_key_pair" "client" {
  key_name   = "${local.prefix}-keypair"
  public_key = tls_private_key.client.public_key_openssh
}

# When the apply that creates each VM started.
resource "time_static" "start" {
  for_each = local.hostnames
  triggers = { hostname = each.key }
}

resource "aws_instance" "vm" {
  for_each = local.hostnames

  ami                    = local.ami_id
  instance_type          = var.machine_type
  subnet_id              = var.subnet_id != "" ? var.subnet_id : null
  vpc_security_group_ids = [aws_security_group.client.id]
  key_name               = aws_key_pair.client.key_name
  iam_instance_profile   = aws_iam_instance_profile.client.name

  # Every value is passed base64-encoded and decoded on the VM, so no value can break out of
  # the script. The token is this VM's own.
  user_data_base64 = base64gzip(templatefile("${path.module}/user_data.sh.tftpl", {
    hostname               = each.key
    allocator_url_b64      = base64encode(var.allocator_url)
    api_token_b64          = base64encode(var.vms[each.key].token)
    agent_download_url_b64 = base64encode(var.agent_download_url)
    agent_sha256           = lower(var.agent_sha256)
    image_name_b64         = base64encode(var.image_name)
    repository_b64         = base64encode(var.repository)
    subject_software_b64   = base64encode(var.subject_software)
    startup_on_error       = var.startup_on_error
    gpu_support            = var.gpu_support
  }))

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
    LaunchRequestedAt = time_static.start[each.key].rfc3339
  }

  lifecycle {
    ignore_changes = [ami, user_data_base64, tags["LaunchRequestedAt"]]
  }
}

# When each VM's creation finished.
resource "time_static" "end" {
  for_each = local.hostnames
  triggers = { instance_id = aws_instance.vm[each.key].id }
}
