# The allocator's role: exactly what the configured provisioner, state and artifact store
# need, chosen statement by statement from the variables (docs/aws-iam.md shows the results).

data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}

locals {
  arn     = data.aws_partition.current.partition
  account = data.aws_caller_identity.current.account_id

  # The client VMs' deployment: the allocator may act only on EC2 resources tagged with it, and
  # with the ManagedBy value of its provisioner (lablink-aws tags "lablink-aws", the shipped
  # client module "lablink-terraform"), so never on this host (ManagedBy = "lablink-deploy")
  # nor on another deployment's or tool's resources.
  client_deployment = var.client_deployment != "" ? var.client_deployment : var.name
  own_resources = {
    for provisioner, managed_by in { aws = "lablink-aws", terraform = "lablink-terraform" } :
    provisioner => {
      StringEquals = {
        "aws:ResourceTag/deployment" = local.client_deployment
        "aws:ResourceTag/ManagedBy"  = managed_by
      }
    }
  }

  # The shipped client module names its role and instance profile
  # "<deployment>-lablink-client-vm-role" and "<deployment>-lablink-client-instance-profile".
  client_iam = [
    "arn:${local.arn}:iam::${local.account}:role/${local.client_deployment}-lablink-client-*",
    "arn:${local.arn}:iam::${local.account}:instance-profile/${local.client_deployment}-lablink-client-*",
  ]

  # Every statement the allocator may need, each with when it needs it; the policy holds the
  # ones that apply (a for expression keeps statements of different shapes in one tuple).
  candidates = [
    {
      # Launching and looking up: these cannot be narrowed to tagged resources.
      on = var.provisioner == "aws"
      statement = {
        Sid    = "Ec2Provisioner"
        Effect = "Allow"
        Action = [
          "ec2:DescribeImages",
          "ec2:DescribeInstanceStatus",
          "ec2:DescribeInstances",
          "ec2:DescribeSecurityGroups",
          "ec2:DescribeSubnets",
          "ec2:RunInstances",
        ]
        Resource = "*"
      }
    },
    {
      # The tags RunInstances puts on the new instances and volumes.
      on = var.provisioner == "aws"
      statement = {
        Sid       = "Ec2TagOnLaunch"
        Effect    = "Allow"
        Action    = "ec2:CreateTags"
        Resource  = "*"
        Condition = { StringEquals = { "ec2:CreateAction" = ["RunInstances"] } }
      }
    },
    {
      # The hostname tags after launch, reboots and terminations: only its own VMs.
      on = var.provisioner == "aws"
      statement = {
        Sid       = "Ec2OwnInstances"
        Effect    = "Allow"
        Action    = ["ec2:CreateTags", "ec2:RebootInstances", "ec2:TerminateInstances"]
        Resource  = "*"
        Condition = local.own_resources.aws
      }
    },
    {
      on = var.provisioner == "aws" && var.client_role_arn != ""
      statement = {
        Sid       = "PassClientRole"
        Effect    = "Allow"
        Action    = "iam:PassRole"
        Resource  = var.client_role_arn
        Condition = { StringEquals = { "iam:PassedToService" = "ec2.amazonaws.com" } }
      }
    },
    {
      # Creating and looking up: these cannot be narrowed to tagged resources.
      on = var.provisioner == "terraform"
      statement = {
        Sid    = "ClientModuleEc2"
        Effect = "Allow"
        Action = [
          "ec2:CreateSecurityGroup",
          "ec2:Describe*",
          "ec2:ImportKeyPair",
          "ec2:RunInstances",
        ]
        Resource = "*"
      }
    },
    {
      # The tags the module's resources get as they are created (default_tags).
      on = var.provisioner == "terraform"
      statement = {
        Sid       = "ClientModuleTagOnCreate"
        Effect    = "Allow"
        Action    = "ec2:CreateTags"
        Resource  = "*"
        Condition = { StringEquals = { "ec2:CreateAction" = ["CreateSecurityGroup", "ImportKeyPair", "RunInstances"] } }
      }
    },
    {
      # Changing and deleting: only the module's own resources of this deployment.
      on = var.provisioner == "terraform"
      statement = {
        Sid    = "ClientModuleOwnResources"
        Effect = "Allow"
        Action = [
          "ec2:AuthorizeSecurityGroupEgress",
          "ec2:AuthorizeSecurityGroupIngress",
          "ec2:CreateTags",
          "ec2:DeleteKeyPair",
          "ec2:DeleteSecurityGroup",
          "ec2:DeleteTags",
          "ec2:ModifyInstanceAttribute",
          "ec2:RebootInstances",
          "ec2:RevokeSecurityGroupEgress",
          "ec2:RevokeSecurityGroupIngress",
          "ec2:TerminateInstances",
        ]
        Resource  = "*"
        Condition = local.own_resources.terraform
      }
    },
    {
      on = var.provisioner == "terraform"
      statement = {
        Sid    = "ClientModuleIam"
        Effect = "Allow"
        Action = [
          "iam:AddRoleToInstanceProfile",
          "iam:CreateInstanceProfile",
          "iam:CreateRole",
          "iam:DeleteInstanceProfile",
          "iam:DeleteRole",
          "iam:GetInstanceProfile",
          "iam:GetRole",
          "iam:ListAttachedRolePolicies",
          "iam:ListInstanceProfilesForRole",
          "iam:ListRolePolicies",
          "iam:RemoveRoleFromInstanceProfile",
          "iam:TagInstanceProfile",
          "iam:TagRole",
          "iam:UntagInstanceProfile",
          "iam:UntagRole",
        ]
        Resource = local.client_iam
      }
    },
    {
      on = var.provisioner == "terraform"
      statement = {
        Sid       = "PassClientRole"
        Effect    = "Allow"
        Action    = "iam:PassRole"
        Resource  = local.client_iam[0]
        Condition = { StringEquals = { "iam:PassedToService" = "ec2.amazonaws.com" } }
      }
    },
    {
      on = var.provisioner == "terraform" && var.state_bucket != ""
      statement = {
        Sid    = "TerraformState"
        Effect = "Allow"
        Action = ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
        Resource = [
          "arn:${local.arn}:s3:::${var.state_bucket}/${var.state_key}",
          "arn:${local.arn}:s3:::${var.state_bucket}/${var.state_key}.tflock",
        ]
      }
    },
    {
      on = var.provisioner == "terraform" && var.state_bucket != ""
      statement = {
        Sid      = "TerraformStateBucket"
        Effect   = "Allow"
        Action   = "s3:ListBucket"
        Resource = "arn:${local.arn}:s3:::${var.state_bucket}"
      }
    },
    {
      on = var.artifact_bucket != ""
      statement = {
        Sid    = "ArtifactObjects"
        Effect = "Allow"
        Action = [
          "s3:AbortMultipartUpload",
          "s3:DeleteObject",
          "s3:GetObject",
          "s3:ListMultipartUploadParts",
          "s3:PutObject",
        ]
        Resource = "arn:${local.arn}:s3:::${var.artifact_bucket}/${var.artifact_prefix}*"
      }
    },
    {
      on = var.artifact_bucket != ""
      statement = {
        Sid      = "ArtifactBucket"
        Effect   = "Allow"
        Action   = "s3:ListBucket"
        Resource = "arn:${local.arn}:s3:::${var.artifact_bucket}"
      }
    },
    {
      # Only the one parameter holding lablink.toml (config.tf).
      on = true
      statement = {
        Sid      = "ConfigParameter"
        Effect   = "Allow"
        Action   = "ssm:GetParameter"
        Resource = "arn:${local.arn}:ssm:${var.region}:${local.account}:parameter${local.config_parameter}"
      }
    },
    {
      # Only the one parameter holding the given database URL (database.tf).
      on = local.external_database
      statement = {
        Sid      = "DatabaseUrlParameter"
        Effect   = "Allow"
        Action   = "ssm:GetParameter"
        Resource = "arn:${local.arn}:ssm:${var.region}:${local.account}:parameter${local.database_parameter}"
      }
    },
  ]
  # (Never empty: the host always reads its configuration parameter.)
  statements = [for c in local.candidates : c.statement if c.on]

  allocator_policy_json = jsonencode({
    Version   = "2012-10-17"
    Statement = local.statements
  })
}

resource "aws_iam_role" "allocator" {
  name        = "${var.name}-allocator"
  description = "The LabLink allocator of ${var.name}"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy" "allocator" {
  name   = "${var.name}-allocator"
  role   = aws_iam_role.allocator.id
  policy = local.allocator_policy_json
}

resource "aws_iam_instance_profile" "allocator" {
  name = "${var.name}-allocator"
  role = aws_iam_role.allocator.name
}
