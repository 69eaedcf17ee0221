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

output "vm_instance_types" {
  description = "Hostname => EC2 instance type (optional for the provisioner: the cost estimate's key)."
  value       = { for h, vm in aws_instance.vm : h => vm.instance_type }
}

output "vm_tokens" {
  description = "Hostname => the agent token the VM was created with, so that later applies keep it."
  value       = { for h, vm in aws_instance.vm : h => try(var.vms[h].token, null) }
  sensitive   = true
}

output "instance_terraform_apply_times" {
  description = "Hostname => how long creating the VM took: seconds, HHh:MMm:SSs, start and end (RFC 3339)."
  value = {
    for h, t in local.apply_seconds : h => {
      seconds    = t
      formatted  = format("%02dh:%02dm:%02ds", floor(t / 3600), floor(t % 3600 / 60), t % 60)
      start_time = terraform_data.start[h].output
      end_time   = terraform_data.end[h].output
    }
  }
}

locals {
  # Seconds since 1970 of the start and end times (RFC 3339, UTC; Terraform has no such
  # function): days from the civil date (Howard Hinnant's days_from_civil), plus the time of
  # day (`h` is Terraform's 24-hour hour; `H` is 12-hour). `y` counts years from March, so
  # February's leap day ends a year.
  # Only VMs whose apply finished: an interrupted apply leaves instances without an end.
  apply_edges = {
    for h, vm in aws_instance.vm : h => {
      for edge, at in { start = terraform_data.start[h].output, end = terraform_data.end[h].output } : edge => {
        y                     = tonumber(formatdate("YYYY", at)) - (tonumber(formatdate("M", at)) <= 2 ? 1 : 0)
        m                     = tonumber(formatdate("M", at))
        d                     = tonumber(formatdate("D", at))
        sod                   = tonumber(formatdate("h", at)) * 3600 + tonumber(formatdate("m", at)) * 60 + tonumber(formatdate("s", at))
      }
    } if contains(keys(terraform_data.end), h)
  }
  epoch_seconds = {
    for h, edges in local.apply_edges : h => {
      for edge, p in edges : edge => (
        floor(p.y / 400) * 146097 + (p.y % 400) * 365 + floor((p.y % 400) / 4) - floor((p.y % 400) / 100)
        + floor((153 * (p.m + (p.m > 2 ? -3 : 9)) + 2) / 5) + p.d - 1 - 719468
      ) * 86400 + p.sod
    }
  }
  apply_seconds = { for h, e in local.epoch_seconds : h => e.end - e.start }
  all_seconds   = values(local.apply_seconds)
}

output "terraform_apply_avg_seconds" {
  description = "Mean creation time of the VMs, in seconds (null without VMs)."
  value       = length(local.all_seconds) > 0 ? sum(local.all_seconds) / length(local.all_seconds) : null
}

output "terraform_apply_max_seconds" {
  description = "Longest creation time of a VM, in seconds (null without VMs)."
  value       = length(local.all_seconds) > 0 ? max(local.all_seconds...) : null
}

output "terraform_apply_min_seconds" {
  description = "Shortest creation time of a VM, in seconds (null without VMs)."
  value       = length(local.all_seconds) > 0 ? min(local.all_seconds...) : null
}
