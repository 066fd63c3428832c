#!/usr/bin/env bash
# Optional QCOW2 export of the Proxmox template (the portability driver of the decision record):
# qemu-img converts the template's disk on the PVE node, then it is copied next to the manifest.
# Does nothing unless EXPORT_DIR and EXPORT_SSH_HOST are set.
set -euo pipefail
if [ -z "${EXPORT_DIR:-}" ] || [ -z "${EXPORT_SSH_HOST:-}" ]; then
  echo "export-qcow2: EXPORT_DIR or EXPORT_SSH_HOST empty, no QCOW2 export"
  exit 0
fi
mkdir -p "$EXPORT_DIR"
remote="/var/tmp/${TEMPLATE_NAME}.qcow2"
# The template's first disk, whatever storage it is on (base-<vmid>-disk-0 after conversion).
ssh -o BatchMode=yes "$EXPORT_SSH_HOST" \
  "set -e; vol=\$(qm config $VM_ID | sed -n 's/^scsi0: \([^,]*\).*/\1/p'); qemu-img convert -O qcow2 \"\$(pvesm path \"\$vol\")\" '$remote'"
scp -o BatchMode=yes "$EXPORT_SSH_HOST:$remote" "$EXPORT_DIR/"
ssh -o BatchMode=yes "$EXPORT_SSH_HOST" "rm -f '$remote'"
sha256sum "$EXPORT_DIR/${TEMPLATE_NAME}.qcow2" | tee "$EXPORT_DIR/${TEMPLATE_NAME}.qcow2.sha256"
