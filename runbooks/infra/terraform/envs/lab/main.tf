# The lab cluster on Proxmox VE: 3 servers over 3 nodes, 2 agents, the kube-vip registration
# address. rke2-vm-deploy runs `terraform plan -var template_vmid=<id>` here and reads
# `terraform output -json` (nodes, registration). The API token comes from the environment
# (PROXMOX_VE_API_TOKEN=user@realm!id=secret), never from a file or the command line.

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    proxmox = {
      source  = "bpg/proxmox"
      version = ">= 0.66.0, < 1.0.0"
    }
  }
}

provider "proxmox" {
  endpoint = var.proxmox_endpoint
  insecure = false
}

module "rke2" {
  source = "../../modules/rke2/proxmox"

  cluster_name = var.cluster_name
  template     = tostring(var.template_vmid)
  hosts        = var.hosts
  site = {
    template_host = var.template_host
    vm_id_base    = var.vm_id_base
  }
  storage         = var.storage
  network         = var.network
  server_count    = var.server_count
  agent_count     = var.agent_count
  server_ips      = var.server_ips
  agent_ips       = var.agent_ips
  gateway         = var.gateway
  dns_servers     = var.dns_servers
  domain          = var.domain
  api_host        = var.api_host
  api_ip          = var.api_ip
  ssh_user        = var.ssh_user
  ssh_public_keys = var.ssh_public_keys
}

output "nodes" {
  value = module.rke2.nodes
}

output "registration" {
  value = module.rke2.registration
}
