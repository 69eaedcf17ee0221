# The allocator's host: one instance with an Elastic IP, its security group, its role
# (iam.tf), optionally an A record, and a first-boot script (user_data.sh.tftpl) that
# installs the release, fetches the configuration (config.tf) from SSM, sets up the database
# and TLS, then starts the service.

data "aws_subnet" "allocator" {
  id = var.subnet_id
}

resource "aws_security_group" "allocator" {
  name        = "${var.name}-allocator-sg"
  description = "LabLink allocator of ${var.name}"
  vpc_id      = data.aws_subnet.allocator.vpc_id

  ingress {
    description = "HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = var.http_cidr_blocks
  }

  ingress {
    description = "HTTP (certificate challenges, redirects; the allocator itself with tls = none)"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = var.http_cidr_blocks
  }

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
    description = "Everything (AWS APIs, packages, the release, the database)"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }

  tags = { Name = "${var.name}-allocator-sg" }
}

locals {
  url_host = var.domain_name != "" ? var.domain_name : aws_eip.allocator.public_ip
  url      = "${var.tls == "none" ? "http" : "https"}://${local.url_host}"

  # Every value reaches the script base64-encoded and is decoded there: none can break out.
  # lablink_toml and a given database URL are not among them: the host reads both from SSM
  # (config.tf, database.tf). [server.tls] comes from LABLINK_SERVER__TLS__* variables.
  user_data = templatefile("${path.module}/user_data.sh.tftpl", {
    release_url_b64    = base64encode(var.release_url)
    release_sha256     = lower(var.release_sha256)
    domain_name_b64    = base64encode(var.domain_name)
    tls                = var.tls
    tls_cert_file_b64  = base64encode(var.tls_cert_file)
    tls_key_file_b64   = base64encode(var.tls_key_file)
    database           = local.external_database ? "ssm" : "local"
    region_b64         = base64encode(var.region)
    config_param_b64   = base64encode(local.config_parameter)
    database_param_b64 = base64encode(local.database_parameter)
  })
}

resource "aws_instance" "allocator" {
  ami                    = var.ami
  instance_type          = var.instance_type
  subnet_id              = var.subnet_id
  vpc_security_group_ids = [aws_security_group.allocator.id]
  key_name               = var.key_name != "" ? var.key_name : null
  iam_instance_profile   = aws_iam_instance_profile.allocator.name
  user_data_base64       = base64gzip(local.user_data)

  metadata_options {
    http_tokens = "required"
  }

  root_block_device {
    volume_size = var.root_volume_gb
    volume_type = "gp3"
    encrypted   = true
  }

  tags = { Name = "${var.name}-allocator" }

  # The first boot reads these parameters with this policy.
  depends_on = [aws_ssm_parameter.lablink_toml, aws_ssm_parameter.database_url, aws_iam_role_policy.allocator]

  lifecycle {
    precondition {
      condition     = var.tls != "caddy" || var.domain_name != ""
      error_message = "tls = \"caddy\" needs domain_name (Caddy gets the certificate for it); use tls = \"none\" or \"builtin\" without one."
    }
    precondition {
      condition     = var.zone_id == "" || var.domain_name != ""
      error_message = "zone_id needs domain_name (the A record's name)."
    }
  }
}

resource "aws_eip" "allocator" {
  domain = "vpc"
  tags   = { Name = "${var.name}-allocator" }
}

resource "aws_eip_association" "allocator" {
  allocation_id = aws_eip.allocator.id
  instance_id   = aws_instance.allocator.id
}

resource "aws_route53_record" "allocator" {
  count   = var.zone_id != "" && var.domain_name != "" ? 1 : 0
  zone_id = var.zone_id
  name    = var.domain_name
  type    = "A"
  ttl     = 300
  records = [aws_eip.allocator.public_ip]
}
