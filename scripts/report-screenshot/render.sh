#!/usr/bin/env bash
# Renders report.html, junit.xml, metrics.prom and per-attempt .cast files for an existing
# evidence bundle (into OUT, not into the bundle, so its SHA256SUMS stays valid), then takes a
# screenshot of the report with headless Chromium.
#
#   scripts/report-screenshot/render.sh <bundle dir>|sample <out dir> [height]
#
# `sample` renders the hand-made failed run used by the unit tests (report::test_support).
#
# Needs: cargo, chromium (apt-get install -y chromium). Uses CARGO_TARGET_DIR if set.
set -euo pipefail
if [ "$1" = sample ]; then bundle=sample; else bundle=$(cd "$1" && pwd); fi
out=$(mkdir -p "$2" && cd "$2" && pwd)
height=${3:-1600}
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"
RUNBOOK_BUNDLE="$bundle" RUNBOOK_OUT="$out" \
  cargo test -q -p runbook-evidence --lib -- --ignored --exact report::tests::render_real_bundle >/dev/null
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --hide-scrollbars --screenshot="$out/report.png" --window-size="1280,$height" \
  "file://$out/report.html" 2>/dev/null
echo "$out/report.html"
echo "$out/report.png"
