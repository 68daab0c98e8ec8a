output "private_ips" {
  value = aws_instance.node[*].private_ip
}

output "status_urls" {
  value = [for ip in aws_instance.node[*].private_ip : "http://${ip}:7070/v1/status"]
}
