#!/usr/bin/env bash
# Post-build check: the properties the RKE2 runbooks rely on, verified on the built image before
# it becomes a template. Prints one PASS/FAIL line per property and fails the build on any FAIL.
set -uo pipefail
failed=0
check() { # name expected found ok
  if [ "$4" = yes ]; then echo "PASS $1: $3"; else echo "FAIL $1: expected $2; found $3"; failed=1; fi
}
yesif() { if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }

. /etc/os-release
check os-release "Rocky Linux 9.x" "$NAME $VERSION_ID" "$(yesif test "$ID" = rocky -a "${VERSION_ID%%.*}" = 9)"
mode=$(getenforce 2>/dev/null || echo absent)
check selinux "Enforcing" "$mode" "$(yesif test "$mode" = Enforcing)"
cfg=$(sed -n 's/^SELINUX=//p' /etc/selinux/config)
check selinux-config "SELINUX=enforcing" "SELINUX=$cfg" "$(yesif test "$cfg" = enforcing)"
swaps=$(swapon --noheadings --show=NAME | tr '\n' ' ')
check swap-active "no active swap" "${swaps:-none}" "$(yesif test -z "$swaps")"
check swap-fstab "no swap in /etc/fstab" "$(awk '$3 == "swap"' /etc/fstab | wc -l) entries" "$(yesif test -z "$(awk '$3 == "swap"' /etc/fstab)")"
for pkg in chrony cloud-init cloud-utils-growpart qemu-guest-agent open-vm-tools iscsi-initiator-utils nfs-utils container-selinux python3-dnf-plugin-versionlock; do
  v=$(rpm -q "$pkg" 2>&1)
  check "package $pkg" installed "$v" "$(yesif rpm -q "$pkg")"
done
for unit in chronyd iscsid cloud-init qemu-guest-agent vmtoolsd sshd; do
  state=$(systemctl is-enabled "$unit" 2>&1)
  check "unit $unit" enabled "$state" "$(yesif systemctl is-enabled --quiet "$unit")"
done
size=$(stat -c %s /etc/machine-id)
check machine-id "empty /etc/machine-id" "$size bytes" "$(yesif test "$size" -eq 0)"
keys=$(ls /etc/ssh/ssh_host_* 2>/dev/null | wc -l)
check ssh-host-keys "none (regenerated per clone)" "$keys files" "$(yesif test "$keys" -eq 0)"
ci=$(ls /var/lib/cloud/instances 2>/dev/null | wc -l)
check cloud-init-clean "no cloud-init instance state" "$ci instances" "$(yesif test "$ci" -eq 0)"
initiator=$(cat /etc/iscsi/initiatorname.iscsi 2>/dev/null)
check iscsi-initiatorname "InitiatorName present (Longhorn)" "${initiator:-missing}" "$(yesif grep -q '^InitiatorName=' /etc/iscsi/initiatorname.iscsi)"
exit "$failed"
