#!/usr/bin/env bash
# Before a Proxmox build: refuses to let `packer build -force` replace a template that VMs were
# cloned from. Reads the cluster's VM list once (/cluster/resources?type=vm), then:
#   - no VM with VM_ID                    -> PASS (the build creates it)
#   - VM_ID exists, FORCE != true         -> FAIL (pick a new template_vmid, or force)
#   - FORCE = true and a VM carries the tag rke2-template-<VM_ID> (set by the Terraform
#     modules on every clone) or has a linked-clone disk on base-<VM_ID>-disk-* -> FAIL
#   - FORCE = true and no clone found     -> PASS (the template is replaced)
# Env: PROXMOX_URL (…/api2/json), PROXMOX_TOKEN_ID, PROXMOX_TOKEN, VM_ID, FORCE, CA_FILE.
set -euo pipefail
: "${PROXMOX_URL:?}" "${PROXMOX_TOKEN_ID:?}" "${VM_ID:?}" "${FORCE:=false}" "${CA_FILE:=}"
if [ -z "${PROXMOX_TOKEN:-}" ]; then
  echo "FAIL template-guard: expected the API token secret in PROXMOX_TOKEN; found it empty" >&2
  exit 1
fi
api() {
  # The token travels in a header read from stdin, never on the command line.
  printf 'header = "Authorization: PVEAPIToken=%s=%s"\n' "$PROXMOX_TOKEN_ID" "$PROXMOX_TOKEN" |
    curl -sS --fail-with-body ${CA_FILE:+--cacert "$CA_FILE"} --config - "$PROXMOX_URL$1"
}
vms=$(api "/cluster/resources?type=vm")
this=$(jq -c --argjson id "$VM_ID" '.data[] | select(.vmid == $id)' <<<"$vms")
if [ -z "$this" ]; then
  echo "PASS template-guard: no VM with id $VM_ID; the build creates the template"
  exit 0
fi
name=$(jq -r '.name // "?"' <<<"$this")
if [ "$FORCE" != true ]; then
  echo "FAIL template-guard: expected no VM with id $VM_ID; found $name; set force=true to replace it (refused if VMs were cloned from it) or build with a new template_vmid" >&2
  exit 1
fi
clones=$(jq -r --arg tag "rke2-template-$VM_ID" \
  '.data[] | select((.tags // "") | split(";") | index($tag)) | "\(.name) (\(.vmid), tag)"' <<<"$vms")
while read -r node vmid vmname; do
  [ -n "$vmid" ] || continue
  if api "/nodes/$node/qemu/$vmid/config" | jq -e --arg base "base-$VM_ID-disk-" \
    '[.data | to_entries[] | select(.value | type == "string" and contains($base))] | length > 0' >/dev/null; then
    clones+=$'\n'"$vmname ($vmid, linked clone)"
  fi
done < <(jq -r --argjson id "$VM_ID" '.data[] | select(.vmid != $id and (.template // 0) == 0) | "\(.node) \(.vmid) \(.name)"' <<<"$vms")
clones=$(sed '/^$/d' <<<"$clones")
if [ -n "$clones" ]; then
  echo "FAIL template-guard: expected no VM cloned from template $VM_ID ($name) before replacing it; found:" >&2
  echo "$clones" >&2
  echo "hint: build with a new template_vmid; point Terraform at it when the clones are gone" >&2
  exit 1
fi
echo "PASS template-guard: force=true and no VM was cloned from $VM_ID ($name); the build replaces it"
