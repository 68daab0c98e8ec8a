variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "name" {
  type        = string
  default     = "shoal"
  description = "Name prefix of every resource, and the instances' shoal-cluster tag."
}

variable "ami_id" {
  type        = string
  description = "The shoal AMI (registered from build/image/shoal.raw, see packer/README.md)."
}

variable "subnet_id" {
  type        = string
  description = "Subnet the machines share."
}

variable "seed_host_number" {
  type        = number
  default     = 10
  description = "Host number (in the subnet) of the first machine's fixed address."
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
  validation {
    condition     = var.node_count >= 1 && var.node_count <= 100
    error_message = "node_count must be between 1 and 100."
  }
}

variable "instance_type" {
  type    = string
  default = "t3.medium"
}

variable "data_volume_gib" {
  type    = number
  default = 50
}

variable "admin_cidrs" {
  type        = list(string)
  default     = []
  description = "Networks allowed to reach the status endpoint and the API."
}

variable "ingress_cidrs" {
  type    = list(string)
  default = ["0.0.0.0/0"]
}
