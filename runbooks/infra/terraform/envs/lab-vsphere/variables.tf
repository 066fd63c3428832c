variable "vcenter_server" {
  type    = string
  default = "vcenter.example.internal"
}

variable "template_name" {
  type        = string
  default     = "rocky9-rke2-96"
  description = "Name of the Packer template (rocky-image-build's template-id output on vSphere)."
}

variable "datacenter" {
  type    = string
  default = "dc1"
}

variable "compute_cluster" {
  type    = string
  default = "cluster1"
}

variable "folder" {
  type    = string
  default = "rke2"
}

variable "cluster_name" {
  type    = string
  default = "lab"
}

variable "hosts" {
  type    = list(string)
  default = ["esxi1.example.internal", "esxi2.example.internal", "esxi3.example.internal"]
}

variable "storage" {
  type    = string
  default = "datastore1"
}

variable "network" {
  type    = string
  default = "VM Network"
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
