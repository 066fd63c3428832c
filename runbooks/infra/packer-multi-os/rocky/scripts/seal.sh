#!/usr/bin/env bash
# Removes what makes a VM unique, so every clone gets its own identity from cloud-init:
# machine-id (empty file, not absent: systemd then creates it on first boot), SSH host keys,
# cloud-init state, logs, DHCP leases, shell history.
set -euo pipefail
cloud-init clean --logs --seed
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -sf /etc/machine-id /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*
rm -f /var/lib/NetworkManager/*.lease /etc/NetworkManager/system-connections/*.nmconnection
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /tmp/* /var/tmp/* /root/.bash_history
dnf clean all
sync
