# The lab cluster on vSphere: the same module contract as envs/lab (Proxmox). Credentials come
# from the environment (VSPHERE_USER, VSPHERE_PASSWORD), never from a file or the command line.
# rke2-vm-deploy runs `terraform plan -var template_name=<name>` here with hypervisor=vsphere.

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    vsphere = {
      source  = "hashicorp/vsphere"
      version = ">= 2.6.0, < 3.0.0"
    }
  }
}

provider "vsphere" {
  vsphere_server       = var.vcenter_server
  allow_unverified_ssl = false
}

module "rke2" {
  source = "../../modules/rke2/vsphere"

  cluster_name = var.cluster_name
  template     = var.template_name
  hosts        = var.hosts
  site = {
    datacenter = var.datacenter
    cluster    = var.compute_cluster
    folder     = var.folder
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
