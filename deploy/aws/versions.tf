terraform {
  required_version = ">= 1.6"

  required_providers {
    # Only the AWS provider: the database password is made on the host (never in the state),
    # and the user data is built with templatefile and base64gzip.
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.100, < 7"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, {
      deployment = var.name
      ManagedBy  = "lablink-deploy"
    })
  }
}
