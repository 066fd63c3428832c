# RKE2 VMs on Proxmox VE (bpg/proxmox): full clones of the Packer template, static addresses and
# the SSH key through the cloud-init drive, the guest agent on, one tag naming the template so
# the image build's guard sees which templates have clones.

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    proxmox = {
      source  = "bpg/proxmox"
      version = ">= 0.66.0, < 1.0.0"
    }
  }
}

resource "proxmox_virtual_environment_vm" "node" {
  for_each = local.nodes

  name        = each.key
  node_name   = each.value.host
  vm_id       = var.site.vm_id_base > 0 ? var.site.vm_id_base + each.value.offset : null
  description = "RKE2 ${each.value.role} of ${var.cluster_name}, cloned from template ${var.template}"
  tags        = sort(distinct(concat(var.tags, ["rke2", var.cluster_name, each.value.role, "rke2-template-${var.template}"])))
  on_boot     = true
  started     = true

  clone {
    vm_id     = tonumber(var.template)
    node_name = var.site.template_host != "" ? var.site.template_host : null
    full      = true
  }

  agent {
    enabled = true
  }

  cpu {
    cores = each.value.cpus
    type  = "host"
  }

  memory {
    dedicated = each.value.memory_mb
  }

  disk {
    datastore_id = var.storage
    interface    = "scsi0"
    size         = each.value.disk_gb
    iothread     = true
    discard      = "on"
  }

  network_device {
    bridge = var.network
    model  = "virtio"
  }

  operating_system {
    type = "l26"
  }

  initialization {
    datastore_id = var.storage
    dns {
      domain  = var.domain
      servers = var.dns_servers
    }
    ip_config {
      ipv4 {
        address = each.value.cidr
        gateway = var.gateway
      }
    }
    user_account {
      username = var.ssh_user
      keys     = var.ssh_public_keys
    }
  }

  lifecycle {
    # A new template must not recreate running nodes; upgrades replace nodes deliberately.
    ignore_changes = [clone, description, tags]
  }
}

locals {
  node_outputs = [for name, n in local.nodes : {
    name     = name
    ip       = split("/", n.cidr)[0]
    role     = n.role
    vmid     = proxmox_virtual_environment_vm.node[name].vm_id
    pve_node = n.host
    host     = n.host
    uuid     = ""
  }]
}
