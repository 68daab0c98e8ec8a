# A shoal cluster on AWS: N machines from the shoal AMI (packer/README.md) started from one
# launch template whose user-data is the cluster bundle from `shoal gen cluster`.
#
#   shoal gen cluster --name prod --out ./prod     # prod/user-data.yaml holds the secrets
#   terraform init && terraform apply -var ami_id=ami-... -var subnet_id=subnet-... \
#     -var user_data_file=./prod/user-data.yaml
#
# A VPC carries no multicast, so mDNS finds nobody here: the first machine gets a fixed private
# address and every machine lists it as a peer (the others are learned from membership).
# The first machine is the signer: its user-data (user-data-signer.yaml) adds the CA key, and
# the others get their certificates from it with the join secret. No machine gets the admin
# token. The user-data still carries secrets: the instances require IMDSv2 tokens and a hop
# limit of 1, so containers on the machines cannot read it.

terraform {
  required_version = ">= 1.3"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

data "aws_subnet" "nodes" {
  id = var.subnet_id
}

locals {
  # The seed: a fixed address inside the subnet for the first machine.
  seed_ip               = cidrhost(data.aws_subnet.nodes.cidr_block, var.seed_host_number)
  signer_user_data_file = coalesce(var.signer_user_data_file, "${dirname(var.user_data_file)}/user-data-signer.yaml")
  user_data = replace(
    file(var.user_data_file),
    "  peers: []",
    "  peers: [\"${local.seed_ip}:7443\"]"
  )
  signer_user_data = replace(
    file(local.signer_user_data_file),
    "  peers: []",
    "  peers: [\"${local.seed_ip}:7443\"]"
  )
}

resource "aws_security_group" "shoal" {
  name_prefix = "${var.name}-"
  description = "shoal nodes: mutual TLS between members, status and ingress from allowed networks"
  vpc_id      = data.aws_subnet.nodes.vpc_id

  ingress {
    description = "API and peer traffic (mutual TLS) between members"
    from_port   = 7443
    to_port     = 7443
    protocol    = "tcp"
    self        = true
  }
  ingress {
    description = "API (admin token) from operators"
    from_port   = 7443
    to_port     = 7443
    protocol    = "tcp"
    cidr_blocks = var.admin_cidrs
  }
  ingress {
    description = "read-only status"
    from_port   = 7070
    to_port     = 7070
    protocol    = "tcp"
    cidr_blocks = var.admin_cidrs
  }
  ingress {
    description = "ingress HTTP"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = var.ingress_cidrs
  }
  ingress {
    description = "ingress HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = var.ingress_cidrs
  }
  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_launch_template" "shoal" {
  name_prefix   = "${var.name}-"
  image_id      = var.ami_id
  instance_type = var.instance_type
  user_data     = base64encode(local.user_data)

  vpc_security_group_ids = [aws_security_group.shoal.id]

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    # A second volume for /var: shoal-init formats a blank disk once and keeps it.
    device_name = "/dev/sdb"
    ebs {
      volume_size           = var.data_volume_gib
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name          = var.name
      shoal-cluster = var.name
    }
  }
}

resource "aws_instance" "node" {
  count     = var.node_count
  subnet_id = var.subnet_id
  # The first machine sits at the seed address every machine dials, and signs the others'
  # certificates: its user-data replaces the template's.
  private_ip       = count.index == 0 ? local.seed_ip : null
  user_data_base64 = count.index == 0 ? base64encode(local.signer_user_data) : null

  launch_template {
    id      = aws_launch_template.shoal.id
    version = aws_launch_template.shoal.latest_version
  }

  tags = {
    Name = "${var.name}-${count.index + 1}"
  }
}
