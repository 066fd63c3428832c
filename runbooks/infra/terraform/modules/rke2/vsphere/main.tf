# RKE2 VMs on vSphere (hashicorp/vsphere): clones of the Packer template, static addresses and
# the SSH key through cloud-init's VMware datasource (guestinfo metadata/userdata), servers kept
# apart by a DRS anti-affinity rule as well as by placement.

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    vsphere = {
      source  = "hashicorp/vsphere"
      version = ">= 2.6.0, < 3.0.0"
    }
  }
}

data "vsphere_datacenter" "dc" {
  name = var.site.datacenter
}

data "vsphere_compute_cluster" "cluster" {
  name          = var.site.cluster
  datacenter_id = data.vsphere_datacenter.dc.id
}

data "vsphere_datastore" "storage" {
  name          = var.storage
  datacenter_id = data.vsphere_datacenter.dc.id
}

data "vsphere_network" "network" {
  name          = var.network
  datacenter_id = data.vsphere_datacenter.dc.id
}

data "vsphere_virtual_machine" "template" {
  name          = var.template
  datacenter_id = data.vsphere_datacenter.dc.id
}

data "vsphere_host" "host" {
  for_each      = toset(var.hosts)
  name          = each.key
  datacenter_id = data.vsphere_datacenter.dc.id
}

resource "vsphere_virtual_machine" "node" {
  for_each = local.nodes

  name             = each.key
  folder           = var.site.folder != "" ? var.site.folder : null
  resource_pool_id = data.vsphere_compute_cluster.cluster.resource_pool_id
  host_system_id   = data.vsphere_host.host[each.value.host].id
  datastore_id     = data.vsphere_datastore.storage.id
  annotation       = "RKE2 ${each.value.role} of ${var.cluster_name}, cloned from template ${var.template}"

  num_cpus  = each.value.cpus
  memory    = each.value.memory_mb
  guest_id  = data.vsphere_virtual_machine.template.guest_id
  firmware  = data.vsphere_virtual_machine.template.firmware
  scsi_type = data.vsphere_virtual_machine.template.scsi_type

  network_interface {
    network_id   = data.vsphere_network.network.id
    adapter_type = "vmxnet3"
  }

  disk {
    label            = "disk0"
    size             = each.value.disk_gb
    thin_provisioned = true
  }

  clone {
    template_uuid = data.vsphere_virtual_machine.template.id
  }

  extra_config = {
    "guestinfo.metadata" = base64encode(templatefile("${path.module}/cloud-init/metadata.yaml.tftpl", {
      hostname    = each.key
      cidr        = each.value.cidr
      gateway     = var.gateway
      dns_servers = var.dns_servers
      domain      = var.domain
    }))
    "guestinfo.metadata.encoding" = "base64"
    "guestinfo.userdata" = base64encode(templatefile("${path.module}/cloud-init/userdata.yaml.tftpl", {
      ssh_user        = var.ssh_user
      ssh_public_keys = var.ssh_public_keys
    }))
    "guestinfo.userdata.encoding" = "base64"
  }

  wait_for_guest_net_timeout = 10

  lifecycle {
    ignore_changes = [clone, annotation]
  }
}

resource "vsphere_compute_cluster_vm_anti_affinity_rule" "servers" {
  count               = var.server_count > 1 ? 1 : 0
  name                = "${var.cluster_name}-rke2-servers-apart"
  compute_cluster_id  = data.vsphere_compute_cluster.cluster.id
  virtual_machine_ids = [for name, n in local.nodes : vsphere_virtual_machine.node[name].id if n.role == "servers"]
}

locals {
  node_outputs = [for name, n in local.nodes : {
    name     = name
    ip       = split("/", n.cidr)[0]
    role     = n.role
    vmid     = 0
    pve_node = ""
    host     = n.host
    uuid     = vsphere_virtual_machine.node[name].uuid
  }]
}
