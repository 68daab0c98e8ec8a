output "addresses" {
  value = [for d in libvirt_domain.node : d.network_interface[0].addresses]
}
