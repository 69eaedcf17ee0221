output "public_ip" {
  description = "The Elastic IP of the allocator host."
  value       = aws_eip.allocator.public_ip
}

output "url" {
  description = "The allocator's URL (domain_name, else the Elastic IP)."
  value       = local.url
}

output "instance_id" {
  description = "The allocator host's EC2 instance id."
  value       = aws_instance.allocator.id
}

output "security_group_id" {
  description = "The allocator host's security group."
  value       = aws_security_group.allocator.id
}

output "role_name" {
  description = "The allocator's IAM role (in the instance profile of the same name)."
  value       = aws_iam_role.allocator.name
}

output "allocator_policy_json" {
  description = "The allocator role's policy, as attached (docs/aws-iam.md explains each statement)."
  value       = local.allocator_policy_json
}
