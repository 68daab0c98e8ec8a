# A shoal cluster on one libvirt host: N UEFI machines from the qcow2 that packer/shoal.pkr.hcl
# makes, on a NAT network of their own where they find each other over mDNS (no peer list).
#
#   packer build -only=qemu.shoal packer/shoal.pkr.hcl        # build/packer/shoal.qcow2
#   shoal gen cluster --name lab --out ./lab
#   terraform init && terraform apply -var user_data_file=./lab/user-data.yaml

terraform {
  required_version = ">= 1.3"
  required_providers {
    libvirt = {
      source  = "dmacvicar/libvirt"
      version = ">= 0.7.0"
    }
  }
}

provider "libvirt" {
  uri = var.libvirt_uri
}

locals {
  # `shoal gen cluster` writes the signer's user-data next to the members'.
  signer_user_data_file = coalesce(var.signer_user_data_file, "${dirname(var.user_data_file)}/user-data-signer.yaml")
}

resource "libvirt_network" "shoal" {
  name      = var.name
  mode      = "nat"
  addresses = [var.network_cidr]
  dhcp {
    enabled = true
  }
}

resource "libvirt_volume" "base" {
  name   = "${var.name}-base.qcow2"
  pool   = var.pool
  source = var.image
  format = "qcow2"
}

resource "libvirt_volume" "root" {
  count          = var.node_count
  name           = "${var.name}-${count.index + 1}-root.qcow2"
  pool           = var.pool
  base_volume_id = libvirt_volume.base.id
  format         = "qcow2"
}

resource "libvirt_volume" "data" {
  # A blank volume per machine: shoal-init formats it once and mounts it at /var.
  count  = var.node_count
  name   = "${var.name}-${count.index + 1}-data.qcow2"
  pool   = var.pool
  size   = var.data_volume_gib * 1024 * 1024 * 1024
  format = "qcow2"
}

resource "libvirt_cloudinit_disk" "seed" {
  count     = var.node_count
  name      = "${var.name}-${count.index + 1}-seed.iso"
  pool      = var.pool
  # The first machine admits the others: it alone gets the CA key.
  user_data = count.index == 0 ? file(local.signer_user_data_file) : file(var.user_data_file)
  meta_data = "instance-id: ${var.name}-${count.index + 1}\nlocal-hostname: ${var.name}-${count.index + 1}\n"
}

resource "libvirt_domain" "node" {
  count     = var.node_count
  name      = "${var.name}-${count.index + 1}"
  memory    = var.memory_mib
  vcpu      = var.vcpus
  machine   = "q35"
  firmware  = var.ovmf_code
  cloudinit = libvirt_cloudinit_disk.seed[count.index].id

  nvram {
    file     = "/var/lib/libvirt/qemu/nvram/${var.name}-${count.index + 1}_VARS.fd"
    template = var.ovmf_vars
  }

  disk {
    volume_id = libvirt_volume.root[count.index].id
  }
  disk {
    volume_id = libvirt_volume.data[count.index].id
  }

  network_interface {
    network_id     = libvirt_network.shoal.id
    wait_for_lease = true
  }

  # Entropy for a fresh guest: without it getrandom() (and dockerd) can wait for minutes.
  xml {
    xslt = file("${path.module}/rng.xsl")
  }

  console {
    type        = "pty"
    target_port = "0"
    target_type = "serial"
  }
}
