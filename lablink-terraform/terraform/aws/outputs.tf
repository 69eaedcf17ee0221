# The outputs contract the provisioner (lablink-terraform) relies on. Maps are keyed by
# hostname; only instances that exist appear in vm_instance_ids.

output "vm_instance_names" {
  description = "Hostnames (Name tags) of the client VMs, sorted."
  value       = sort(keys(aws_instance.vm))
}

output "vm_instance_ids" {
  description = "Hostname => EC2 instance id."
  value       = { for h, vm in aws_instance.vm : h => vm.id }
}

output "vm_private_ips" {
  description = "Hostname => private IP address."
  value       = { for h, vm in aws_instance.vm : h => vm.private_ip }
}

output "vm_public_ips" {
  description = "Hostname => public IP address (null without one)."
  value       = { for h, vm in aws_instance.vm : h => vm.public_ip }
}

output "vm_tokens" {
  description = "Hostname => the agent token the VM was created with, so that later applies keep it."
  value       = { for h, vm in aws_instance.vm : h => try(var.vms[h].token, null) }
  sensitive   = true
}

output "lablink_private_key_pem" {
  description = "The SSH key of the client VMs."
  value       = tls_private_key.client.private_key_pem
  sensitive   = true
}

output "instance_terraform_apply_times" {
  description = "Hostname => how long creating the VM took: seconds, HHh:MMm:SSs, start and end (RFC 3339)."
  value = {
    for h, vm in aws_instance.vm : h => {
      seconds = time_static.end[h].unix - time_static.start[h].unix
      formatted = format("%02dh:%02dm:%02ds",
        floor((time_static.end[h].unix - time_static.start[h].unix) / 3600),
        floor((time_static.end[h].unix - time_static.start[h].unix) % 3600 / 60),
      (time_static.end[h].unix - time_static.start[h].unix) % 60)
      start_time = time_static.start[h].rfc3339
      end_time   = time_static.end[h].rfc3339
    }
  }
}

locals {
  apply_seconds = [for h, t in time_static.end : t.unix - time_static.start[h].unix]
}

output "terraform_apply_avg_seconds" {
  description = "Mean creation time of the VMs, in seconds (null without VMs)."
  value       = length(local.apply_seconds) > 0 ? sum(local.apply_seconds) / length(local.apply_seconds) : null
}

output "terraform_apply_max_seconds" {
  description = "Longest creation time of a VM, in seconds (null without VMs)."
  value       = length(local.apply_seconds) > 0 ? max(local.apply_seconds...) : null
}

output "terraform_apply_min_seconds" {
  description = "Shortest creation time of a VM, in seconds (null without VMs)."
  value       = length(local.apply_seconds) > 0 ? min(local.apply_seconds...) : null
}
