# One variable set for both builders. The runbook sets the Proxmox ones through PKR_VAR_*
# (runbooks/rocky-image-build.toml); secrets only ever arrive through the environment.

# ---------------------------------------------------------------- the image (both builders)

variable "rocky_version" {
  type        = string
  default     = "9.6"
  description = "Pinned Rocky Linux minor release; change it together with iso_url and iso_checksum."
}

variable "iso_url" {
  type        = string
  default     = "https://dl.rockylinux.org/vault/rocky/9.6/isos/x86_64/Rocky-9.6-x86_64-dvd.iso"
  description = "Installer ISO download URL (vSphere uploads it; Proxmox downloads it when iso_file is empty)."
}

variable "iso_checksum" {
  type        = string
  default     = "sha256:8ff2a47e2f3bfe442617fceb7ef289b7b1d2d0502089dbbd505d5368b2b3a90f"
  description = "Checksum of the pinned ISO (Rocky's CHECKSUM file for the release)."
}

variable "template_name" {
  type        = string
  default     = "rocky9-rke2"
  description = "Template name prefix; the Rocky release and the build date are appended."
}

variable "rke2_version" {
  type        = string
  default     = "v1.33.4+rke2r1"
  description = "RKE2 version the image is meant for: recorded in the template notes, the image holds no RKE2."
}

variable "cpus" {
  type    = number
  default = 2
}

variable "memory_mb" {
  type    = number
  default = 4096
}

variable "disk_size_gb" {
  type        = number
  default     = 40
  description = "Template disk; Terraform grows it per role on clone."
}

variable "ssh_username" {
  type        = string
  default     = "packer"
  description = "Build-time account created by the kickstart and removed by seal.sh."
}

variable "ssh_private_key_file" {
  type        = string
  default     = "id_ed25519"
  description = "Private key Packer logs in with (build account only)."
}

variable "ssh_public_key_file" {
  type        = string
  default     = "id_ed25519.pub"
  description = "Its public half, rendered into the kickstart (sshkey --username=packer)."
}

variable "http_bind_address" {
  type        = string
  default     = "0.0.0.0"
  description = "Where Packer serves http/ks.cfg; the VM must reach it."
}

variable "export_dir" {
  type        = string
  default     = ""
  description = "When set, also export the image there: OVA on vSphere, QCOW2 on Proxmox (needs export_ssh_host)."
}

variable "export_ssh_host" {
  type        = string
  default     = ""
  description = "root@<pve node> for the QCOW2 export (qemu-img convert of the template disk over SSH)."
}

# ------------------------------------------------------------------------- Proxmox VE

variable "proxmox_url" {
  type    = string
  default = "https://pve1.example.internal:8006/api2/json"
}

variable "proxmox_node" {
  type    = string
  default = "pve1"
}

variable "proxmox_username" {
  type        = string
  default     = "packer@pve!build"
  description = "API token id (user@realm!name)."
}

variable "pve_token" {
  type        = string
  default     = ""
  sensitive   = true
  description = "API token secret (PKR_VAR_pve_token, never on a command line)."
}

variable "vm_id" {
  type        = number
  default     = 9000
  description = "VM id of the template (the runbook's template guard refuses to replace one with clones)."
}

variable "iso_file" {
  type        = string
  default     = "local:iso/Rocky-9.6-x86_64-dvd.iso"
  description = "ISO already on a Proxmox storage; empty = download iso_url into iso_storage_pool."
}

variable "iso_storage_pool" {
  type    = string
  default = "local"
}

variable "proxmox_storage_pool" {
  type    = string
  default = "local-lvm"
}

variable "proxmox_bridge" {
  type    = string
  default = "vmbr0"
}

# ------------------------------------------------------------------------------ vSphere

variable "vcenter_server" {
  type    = string
  default = "vcenter.example.internal"
}

variable "vcenter_username" {
  type    = string
  default = "packer@vsphere.local"
}

variable "vcenter_password" {
  type        = string
  default     = ""
  sensitive   = true
  description = "PKR_VAR_vcenter_password, never on a command line."
}

variable "vsphere_datacenter" {
  type    = string
  default = "dc1"
}

variable "vsphere_cluster" {
  type    = string
  default = "cluster1"
}

variable "vsphere_datastore" {
  type    = string
  default = "datastore1"
}

variable "vsphere_network" {
  type    = string
  default = "VM Network"
}

variable "vsphere_folder" {
  type    = string
  default = "templates"
}
