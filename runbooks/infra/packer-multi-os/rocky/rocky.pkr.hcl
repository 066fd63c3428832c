# Rocky Linux 9 RKE2-ready template for Proxmox VE (proxmox-iso) and vSphere (vsphere-iso), from
# one kickstart (http/ks.cfg) and one variable set (variables.pkr.hcl).
#
#   packer init . && packer validate . && packer build -only=proxmox-iso.rocky9 .
#   packer build -only=vsphere-iso.rocky9 .

packer {
  required_version = ">= 1.10.0"
  required_plugins {
    proxmox = {
      version = ">= 1.2.0"
      source  = "github.com/hashicorp/proxmox"
    }
    vsphere = {
      version = ">= 1.4.0"
      source  = "github.com/hashicorp/vsphere"
    }
  }
}

locals {
  build_date = formatdate("YYYYMMDD-hhmm", timestamp())
  # vSphere templates get a unique name per build, so `-force` can never hit one VMs were
  # cloned from; Proxmox templates keep the pinned vm_id and go through the runbook's guard.
  template_name = "${var.template_name}-${replace(var.rocky_version, ".", "")}-${local.build_date}"
  notes         = "Rocky ${var.rocky_version} for RKE2 ${var.rke2_version}, built ${local.build_date} by Packer"
  # The kickstart with the build key in it, served as /ks.cfg (no key is committed).
  http_content = {
    "/ks.cfg" = templatefile("${path.root}/http/ks.cfg.pkrtpl", {
      ssh_public_key = trimspace(file(var.ssh_public_key_file))
    })
  }
  boot_command = [
    "<up><tab> inst.text inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg<enter>"
  ]
}

source "proxmox-iso" "rocky9" {
  proxmox_url = var.proxmox_url
  username    = var.proxmox_username
  token       = var.pve_token
  node        = var.proxmox_node

  vm_id                = var.vm_id
  vm_name              = local.template_name
  template_name        = local.template_name
  template_description = local.notes
  tags                 = "rocky9;rke2-template"

  boot_iso {
    type             = "ide"
    iso_file         = var.iso_file != "" ? var.iso_file : null
    iso_url          = var.iso_file == "" ? var.iso_url : null
    iso_storage_pool = var.iso_file == "" ? var.iso_storage_pool : null
    iso_checksum     = var.iso_checksum
    unmount          = true
  }

  os              = "l26"
  cpu_type        = "host"
  cores           = var.cpus
  memory          = var.memory_mb
  scsi_controller = "virtio-scsi-single"
  qemu_agent      = true

  disks {
    type         = "scsi"
    disk_size    = "${var.disk_size_gb}G"
    storage_pool = var.proxmox_storage_pool
    format       = "raw"
    io_thread    = true
  }

  network_adapters {
    model  = "virtio"
    bridge = var.proxmox_bridge
  }

  cloud_init              = true
  cloud_init_storage_pool = var.proxmox_storage_pool

  http_content      = local.http_content
  http_bind_address = var.http_bind_address
  boot_wait         = "10s"
  boot_command      = local.boot_command

  ssh_username         = var.ssh_username
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "30m"
}

source "vsphere-iso" "rocky9" {
  vcenter_server      = var.vcenter_server
  username            = var.vcenter_username
  password            = var.vcenter_password
  datacenter          = var.vsphere_datacenter
  cluster             = var.vsphere_cluster
  datastore           = var.vsphere_datastore
  folder              = var.vsphere_folder
  insecure_connection = false

  vm_name             = local.template_name
  notes               = local.notes
  guest_os_type       = "rhel9_64Guest"
  firmware            = "bios"
  CPUs                = var.cpus
  RAM                 = var.memory_mb
  disk_controller_type = ["pvscsi"]

  storage {
    disk_size             = var.disk_size_gb * 1024
    disk_thin_provisioned = true
  }

  network_adapters {
    network      = var.vsphere_network
    network_card = "vmxnet3"
  }

  iso_url      = var.iso_url
  iso_checksum = var.iso_checksum

  http_content      = local.http_content
  http_bind_address = var.http_bind_address
  boot_wait         = "10s"
  boot_command      = local.boot_command

  ssh_username         = var.ssh_username
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "30m"

  convert_to_template = true

  dynamic "export" {
    for_each = var.export_dir != "" ? [var.export_dir] : []
    content {
      format           = "ova"
      output_directory = export.value
      force            = true
    }
  }
}

# No build name: `-only=proxmox-iso.rocky9` / `-only=vsphere-iso.rocky9` select a source as is.
build {
  sources = ["source.proxmox-iso.rocky9", "source.vsphere-iso.rocky9"]

  # Updates, then sealing, then the check (so it sees the image as it ships: machine-id empty,
  # cloud-init clean), then the build account loses its access, the one change after the check.
  provisioner "shell" {
    execute_command = "sudo -n env {{ .Vars }} bash '{{ .Path }}'"
    inline          = ["dnf -y update", "dnf clean all"]
  }

  provisioner "shell" {
    execute_command = "sudo -n env {{ .Vars }} bash '{{ .Path }}'"
    script          = "scripts/seal.sh"
  }

  provisioner "shell" {
    execute_command = "sudo -n env {{ .Vars }} bash '{{ .Path }}'"
    script          = "scripts/check-image.sh"
  }

  provisioner "shell" {
    execute_command   = "sudo -n env {{ .Vars }} bash '{{ .Path }}'"
    environment_vars  = ["BUILD_USER=${var.ssh_username}"]
    inline            = ["passwd -l \"$BUILD_USER\"", "rm -f \"/etc/sudoers.d/$BUILD_USER\" \"/home/$BUILD_USER/.ssh/authorized_keys\""]
    expect_disconnect = true
  }

  post-processor "manifest" {
    output     = "packer-manifest.json"
    strip_path = true
    custom_data = {
      rocky_version = var.rocky_version
      iso_checksum  = var.iso_checksum
      rke2_version  = var.rke2_version
      template_name = local.template_name
    }
  }

  post-processor "shell-local" {
    only = ["proxmox-iso.rocky9"]
    environment_vars = [
      "EXPORT_DIR=${var.export_dir}",
      "EXPORT_SSH_HOST=${var.export_ssh_host}",
      "VM_ID=${var.vm_id}",
      "TEMPLATE_NAME=${local.template_name}",
    ]
    script = "scripts/export-qcow2.sh"
  }
}
