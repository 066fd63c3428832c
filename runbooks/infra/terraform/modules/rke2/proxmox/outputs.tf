# Outputs of the RKE2 VM module (the same in proxmox/ and vsphere/). rke2-vm-deploy reads
# `nodes` (terraform output -json) and writes its inventory from it, replacing the lab hosts.

output "nodes" {
  description = "Every VM: name, ip, role (servers|agents), vmid and pve_node (Proxmox; 0 and \"\" on vSphere), host (hypervisor host), uuid (vSphere; \"\" on Proxmox)."
  value       = local.node_outputs
}

output "registration" {
  description = "The fixed registration address: kube-vip VIP on the servers, forwarding nothing (the VIP is a node address), serving :9345 and :6443."
  value = {
    host           = var.api_host
    ip             = var.api_ip
    supervisor_url = "https://${var.api_host}:9345"
    api_url        = "https://${var.api_host}:6443"
    mode           = "kube-vip"
  }
}

output "ssh_user" {
  value = var.ssh_user
}
