terraform {
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    # Only the AWS provider: apply times come from `terraform_data` and built-in functions,
    # and the SSH key is one you bring (a generated one would sit in the state).
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.100, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = local.common_tags
  }
}
