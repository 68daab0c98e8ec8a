# Turns build/image/shoal.raw into cloud images.
#
#   image/build                              # build/image/shoal.raw
#   packer validate packer/shoal.pkr.hcl
#   packer build -only=qemu.shoal packer/shoal.pkr.hcl
#
# The qemu source converts the raw disk into a compressed qcow2 (OpenStack, libvirt, Proxmox,
# GCE via `qemu-img convert -O raw` + tar). It boots the image once under UEFI so a disk that
# does not start fails the build, but with -snapshot: nothing of that boot (a formatted data
# partition, a machine id, a node identity) reaches the output, so every machine made from the
# image starts blank. shoal has no SSH, so there is no communicator and nothing to provision:
# a shoal machine is configured only by its user-data at boot.
#
# The AWS AMI path (import the raw disk as an EBS snapshot, register it as a UEFI image) is in
# packer/README.md; it needs an account, so it is documented rather than run here.

variable "image" {
  type        = string
  default     = "build/image/shoal.raw"
  description = "The raw GPT disk image/build produces."
}

variable "output_directory" {
  type    = string
  default = "build/packer"
}

variable "ovmf" {
  type        = string
  default     = "/usr/share/qemu/OVMF.fd"
  description = "UEFI firmware for the test boot (Debian's ovmf package)."
}

variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "tcg works everywhere; kvm where it is known to work."
}

variable "disk_size" {
  type        = string
  default     = "8G"
  description = "Virtual size of the qcow2; shoal-init grows nothing, the data partition is used as is."
}

source "qemu" "shoal" {
  iso_url          = var.image
  iso_checksum     = "file:${var.image}.sha256"
  disk_image       = true
  use_backing_file = false
  format           = "qcow2"
  disk_compression = true
  disk_size        = var.disk_size
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  accelerator      = var.accelerator
  machine_type     = "q35"
  memory           = 2048
  cpus             = 2
  headless         = true
  communicator     = "none"
  # Long enough to see slot A come up on the serial console under emulation.
  boot_wait        = "45s"
  shutdown_timeout = "2m"
  output_directory = var.output_directory
  vm_name          = "shoal.qcow2"
  qemuargs = [
    ["-snapshot"],
    ["-bios", var.ovmf],
    ["-device", "virtio-rng-pci"],
    ["-serial", "file:${var.output_directory}-console.log"],
  ]
}

build {
  sources = ["source.qemu.shoal"]

  post-processor "checksum" {
    checksum_types = ["sha256"]
    output         = "${var.output_directory}/shoal.qcow2.{{.ChecksumType}}"
  }
}
