# LabLink client-VM module for AWS. The provisioner (lablink-terraform) sets `vms` and
# `deployment`; everything else comes from the allocator's configuration.

variable "vms" {
  description = "The client VMs: hostname => { token }. The token is that VM's agent token (API_TOKEN)."
  type = map(object({
    token = string
  }))
  sensitive = true
  default   = {}

  validation {
    condition     = alltrue([for h in keys(var.vms) : can(regex("^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$", h))])
    error_message = "Every hostname must be 1-253 characters of [A-Za-z0-9._-], starting with a letter or digit."
  }
}

variable "deployment" {
  description = "The deployment these VMs belong to: a tag on every resource, and part of shared resource names."
  type        = string
  default     = "lablink"
}

variable "resource_prefix" {
  description = "Prefix of the names of shared resources (security group, key pair, IAM role). Empty: <deployment>-lablink-client."
  type        = string
  default     = ""
}

variable "allocator_url" {
  description = "URL at which the agents reach the allocator (ALLOCATOR_URL)."
  type        = string
  sensitive   = true
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-west-2"
}

variable "machine_type" {
  description = "EC2 instance type of the client VMs."
  type        = string
  default     = "t3.large"
}

variable "gpu_support" {
  description = "Client VMs have GPUs: picks the Deep Learning GPU AMI when client_ami_id is empty, and starts the container with --gpus all."
  type        = bool
  default     = false
}

variable "client_ami_id" {
  description = "AMI of the client VMs. Empty: the newest Ubuntu 22.04 AMI, or the newest Deep Learning OSS Nvidia Driver GPU AMI with gpu_support."
  type        = string
  default     = ""
}

variable "root_volume_gb" {
  description = "Size of the root volume (gp3), in GB."
  type        = number
  default     = 80
}

variable "subnet_id" {
  description = "Subnet of the client VMs. Empty: the default subnet of the default VPC."
  type        = string
  default     = ""
}

variable "vpc_id" {
  description = "VPC of the security group. Empty: the default VPC."
  type        = string
  default     = ""
}

variable "ssh_public_key" {
  description = "An OpenSSH public key allowed on the VMs (empty: no SSH key pair)."
  type        = string
  default     = ""
}

variable "ssh_cidr_blocks" {
  description = "Networks allowed to reach the client VMs over SSH. Empty: no SSH ingress."
  type        = list(string)
  default     = []
}

variable "agent_download_url" {
  description = "Where user data downloads the lablink-agent binary from. Empty: the AMI already has it at /usr/local/bin/lablink-agent."
  type        = string
  default     = ""
}

variable "agent_sha256" {
  description = "Expected SHA-256 of the downloaded agent binary (64 hex digits). Empty: not checked."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^([0-9a-fA-F]{64})?$", var.agent_sha256))
    error_message = "agent_sha256 must be 64 hexadecimal digits (or empty)."
  }
}

variable "image_name" {
  description = "Client Docker image the agent runs (SUBJECT_IMAGE). Empty: none."
  type        = string
  default     = ""
}

variable "repository" {
  description = "Tutorial repository to clone in the client (TUTORIAL_REPO_TO_CLONE). Empty: none."
  type        = string
  default     = ""
}

variable "startup_on_error" {
  description = "What the client does when its start-up script fails: continue or fail (STARTUP_ON_ERROR)."
  type        = string
  default     = "continue"

  validation {
    condition     = contains(["continue", "fail"], var.startup_on_error)
    error_message = "startup_on_error must be \"continue\" or \"fail\"."
  }
}

variable "startup_script" {
  description = "A start-up script the agent runs, with retries, before the VM becomes available: a path on the image, or the script itself (LABLINK_STARTUP_SCRIPT). Empty: none."
  type        = string
  default     = ""
}

variable "desktop_user" {
  description = "The desktop user: Chrome Remote Desktop's --user-name, whose home the container mounts and the tutorial is cloned into (LABLINK_CRD_USER)."
  type        = string
  default     = "ubuntu"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_-]{0,31}$", var.desktop_user))
    error_message = "desktop_user must be a user name: up to 32 of [a-z0-9_-], starting with a letter or '_'."
  }
}

variable "inuse_process" {
  description = "The research software's process name, which tells whether the VM is in use (LABLINK_INUSE_PROCESS). Empty: never reported in use."
  type        = string
  default     = ""
}

variable "log_files" {
  description = "Log files the agent ships, as stream=path with stream cloud_init, container or agent (LABLINK_LOG_FILES)."
  type        = list(string)
  default     = ["cloud_init=/var/log/cloud-init-output.log"]

  validation {
    condition     = alltrue([for f in var.log_files : can(regex("^(cloud_init|container|agent)=/[^,]*$", f))])
    error_message = "Every log_files entry must be stream=/absolute/path with stream cloud_init, container or agent."
  }
}

variable "extra_tags" {
  description = "More tags for every resource."
  type        = map(string)
  default     = {}
}
