#!/usr/bin/env bash
# Takes a screenshot of a bundle's report.html with headless Chromium, to look at what an
# assessor sees. The report is written by `runbook` itself when the bundle is sealed (and
# rewritten by `runbook evidence repair`).
#
#   scripts/report-screenshot/render.sh <bundle dir> <out dir> [height]
#
# Needs: chromium (apt-get install -y chromium).
set -euo pipefail
bundle=$(cd "$1" && pwd)
out=$(mkdir -p "$2" && cd "$2" && pwd)
height=${3:-1600}
[ -f "$bundle/report.html" ] || { echo "no report.html in $bundle" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --hide-scrollbars --screenshot="$out/report.png" --window-size="1280,$height" \
  "file://$bundle/report.html" 2>/dev/null
echo "$out/report.png"
