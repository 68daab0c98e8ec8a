variable "libvirt_uri" {
  type    = string
  default = "qemu:///system"
}

variable "name" {
  type    = string
  default = "shoal"
}

variable "image" {
  type        = string
  default     = "../../../build/packer/shoal.qcow2"
  description = "The qcow2 packer/shoal.pkr.hcl writes."
}

variable "user_data_file" {
  type        = string
  description = "user-data.yaml written by `shoal gen cluster`, for member machines (join secret; no CA key, no admin token)."
}

variable "signer_user_data_file" {
  type        = string
  default     = null
  description = "user-data-signer.yaml for the first machine, which admits the others (it adds the CA key). Default: next to user_data_file."
}

variable "node_count" {
  type    = number
  default = 3
}

variable "pool" {
  type    = string
  default = "default"
}

variable "network_cidr" {
  type    = string
  default = "10.77.0.0/24"
}

variable "memory_mib" {
  type    = number
  default = 2048
}

variable "vcpus" {
  type    = number
  default = 2
}

variable "data_volume_gib" {
  type    = number
  default = 20
}

variable "ovmf_code" {
  type    = string
  default = "/usr/share/OVMF/OVMF_CODE_4M.fd"
}

variable "ovmf_vars" {
  type    = string
  default = "/usr/share/OVMF/OVMF_VARS_4M.fd"
}
