variable "proxmox_endpoint" {
  type    = string
  default = "https://pve1.example.internal:8006/"
}

variable "template_vmid" {
  type        = number
  default     = 9000
  description = "VM id of the Packer template (rocky-image-build's template-id output)."
}

variable "template_host" {
  type    = string
  default = "pve1"
}

variable "vm_id_base" {
  type    = number
  default = 0
}

variable "cluster_name" {
  type    = string
  default = "lab"
}

variable "hosts" {
  type    = list(string)
  default = ["pve1", "pve2", "pve3"]
}

variable "storage" {
  type    = string
  default = "local-lvm"
}

variable "network" {
  type    = string
  default = "vmbr0"
}

variable "server_count" {
  type    = number
  default = 3
}

variable "agent_count" {
  type    = number
  default = 2
}

variable "server_ips" {
  type    = list(string)
  default = ["10.0.10.11/24", "10.0.10.12/24", "10.0.10.13/24"]
}

variable "agent_ips" {
  type    = list(string)
  default = ["10.0.10.21/24", "10.0.10.22/24"]
}

variable "gateway" {
  type    = string
  default = "10.0.10.1"
}

variable "dns_servers" {
  type    = list(string)
  default = ["10.0.10.1"]
}

variable "domain" {
  type    = string
  default = "example.internal"
}

variable "api_host" {
  type    = string
  default = "rke2-api.example.internal"
}

variable "api_ip" {
  type    = string
  default = "10.0.10.10"
}

variable "ssh_user" {
  type    = string
  default = "rocky"
}

variable "ssh_public_keys" {
  type        = list(string)
  default     = []
  description = "Keys for ssh_user; set in terraform.tfvars (see terraform.tfvars.example)."
}
