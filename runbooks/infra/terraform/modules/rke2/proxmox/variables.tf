# Inputs of the RKE2 VM module. proxmox/variables.tf and vsphere/variables.tf are the same file
# (a test compares them): one contract, two hypervisors. Sizing defaults follow the decision
# record: 2 vCPU, 4-8 GB, 40 GB (servers) / 60 GB (agents); 1 or 3 servers.

variable "cluster_name" {
  type        = string
  description = "Cluster name: VM name prefix and tag."
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}$", var.cluster_name))
    error_message = "cluster_name must be lower-case letters, digits and '-' (a DNS label, at most 31 characters)."
  }
}

variable "template" {
  type        = string
  description = "The Packer template: its VM id on Proxmox (\"9000\"), its name on vSphere."
}

variable "hosts" {
  type        = list(string)
  description = "Hypervisor hosts (Proxmox nodes / ESXi hosts). Servers are placed round-robin, so with 3 or more hosts no two servers share one; agents follow on."
  validation {
    condition     = length(var.hosts) > 0
    error_message = "hosts must name at least one Proxmox node or ESXi host."
  }
}

variable "site" {
  type = object({
    datacenter    = optional(string, "")
    cluster       = optional(string, "")
    folder        = optional(string, "")
    template_host = optional(string, "")
    vm_id_base    = optional(number, 0)
  })
  default     = {}
  description = "Hypervisor-specific placement: vSphere uses datacenter, cluster, folder; Proxmox uses template_host (the node holding the template) and vm_id_base (0 = next free ids)."
}

variable "storage" {
  type        = string
  description = "Datastore for the VM disks (Proxmox storage id such as local-lvm / vSphere datastore name)."
}

variable "network" {
  type        = string
  description = "Network the VMs attach to (Proxmox bridge such as vmbr0 / vSphere port group)."
}

variable "server_count" {
  type    = number
  default = 3
  validation {
    condition     = contains([1, 3], var.server_count)
    error_message = "server_count must be 1 or 3: etcd needs an odd number, and the record allows 1-3 servers."
  }
}

variable "server_cpus" {
  type    = number
  default = 2
  validation {
    condition     = var.server_cpus >= 2
    error_message = "server_cpus must be at least 2 (decision record sizing)."
  }
}

variable "server_memory_mb" {
  type    = number
  default = 8192
  validation {
    condition     = var.server_memory_mb >= 4096 && var.server_memory_mb <= 8192
    error_message = "server_memory_mb must be 4096-8192 (decision record: 4-8 GB)."
  }
}

variable "server_disk_gb" {
  type    = number
  default = 40
  validation {
    condition     = var.server_disk_gb >= 40
    error_message = "server_disk_gb must be at least 40 (decision record)."
  }
}

variable "agent_count" {
  type    = number
  default = 2
  validation {
    condition     = var.agent_count >= 0
    error_message = "agent_count must not be negative."
  }
}

variable "agent_cpus" {
  type    = number
  default = 2
  validation {
    condition     = var.agent_cpus >= 2
    error_message = "agent_cpus must be at least 2 (decision record sizing)."
  }
}

variable "agent_memory_mb" {
  type    = number
  default = 8192
  validation {
    condition     = var.agent_memory_mb >= 4096 && var.agent_memory_mb <= 8192
    error_message = "agent_memory_mb must be 4096-8192 (decision record: 4-8 GB)."
  }
}

variable "agent_disk_gb" {
  type    = number
  default = 60
  validation {
    condition     = var.agent_disk_gb >= 60
    error_message = "agent_disk_gb must be at least 60 (decision record; Longhorn replicas live there)."
  }
}

variable "server_ips" {
  type        = list(string)
  description = "Static addresses of the servers in CIDR form (10.0.10.11/24), one per server."
}

variable "agent_ips" {
  type        = list(string)
  default     = []
  description = "Static addresses of the agents in CIDR form, one per agent."
}

variable "gateway" {
  type = string
}

variable "dns_servers" {
  type    = list(string)
  default = []
}

variable "domain" {
  type    = string
  default = ""
}

variable "api_host" {
  type        = string
  description = "Fixed registration address (DNS name of the VIP) for :9345 and :6443."
}

variable "api_ip" {
  type        = string
  description = "The registration VIP: kube-vip announces it from the server holding the lease (ARP). Must be free and outside server_ips/agent_ips and the MetalLB range."
}

variable "ssh_user" {
  type    = string
  default = "rocky"
}

variable "ssh_public_keys" {
  type        = list(string)
  description = "Public keys cloud-init authorizes for ssh_user."
}

variable "tags" {
  type    = list(string)
  default = []
}
