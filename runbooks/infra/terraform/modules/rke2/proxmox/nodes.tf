# The node list both modules build from (the same in proxmox/ and vsphere/): names, roles,
# addresses, sizing and placement. Servers go round-robin over var.hosts first, so with three
# hosts the three servers land on three different hosts (anti-affinity by placement).

locals {
  servers = [for i in range(var.server_count) : {
    name      = "${var.cluster_name}-server-${i + 1}"
    role      = "servers"
    cidr      = var.server_ips[i]
    cpus      = var.server_cpus
    memory_mb = var.server_memory_mb
    disk_gb   = var.server_disk_gb
    host      = var.hosts[i % length(var.hosts)]
    offset    = i
  }]
  agents = [for i in range(var.agent_count) : {
    name      = "${var.cluster_name}-agent-${i + 1}"
    role      = "agents"
    cidr      = var.agent_ips[i]
    cpus      = var.agent_cpus
    memory_mb = var.agent_memory_mb
    disk_gb   = var.agent_disk_gb
    host      = var.hosts[(var.server_count + i) % length(var.hosts)]
    offset    = 10 + i
  }]
  nodes        = { for n in concat(local.servers, local.agents) : n.name => n }
  node_ips     = [for n in values(local.nodes) : split("/", n.cidr)[0]]
  prefix       = split("/", var.server_ips[0])[1]
  server_hosts = distinct([for s in local.servers : s.host])
}

check "addresses" {
  assert {
    condition     = length(var.server_ips) == var.server_count && length(var.agent_ips) == var.agent_count
    error_message = "server_ips needs one address per server and agent_ips one per agent."
  }
  assert {
    condition     = length(distinct(local.node_ips)) == length(local.node_ips) && !contains(local.node_ips, var.api_ip)
    error_message = "Node addresses must be unique and the registration VIP (api_ip) must not be one of them."
  }
}

check "anti_affinity" {
  assert {
    condition     = length(local.server_hosts) == min(var.server_count, length(var.hosts))
    error_message = "Servers share a hypervisor host although more hosts are listed."
  }
}
