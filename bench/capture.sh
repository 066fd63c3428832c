#!/usr/bin/env bash
# Capture throughput (issue #19): one step printing about 1 GB of base64
# (`head -c 768M /dev/zero | base64`), captured by runbook with full evidence and one secret
# param set (so the redactor really works), by make and ninja (output to a file), and by a
# plain pipe (`| cat > file`, the floor). Prints, per tool, the median wall time, throughput,
# CPU seconds (user + sys of the whole process tree), CPU over the producer, peak RSS, and the
# ratios to make; exits 1 when runbook misses a goal (throughput >= GOAL_RATIO x make's,
# peak RSS <= RSS_GOAL_MIB), 0 otherwise. A benchmark, not a test: CI does not run it.
#
# Environment (besides lib.sh's RUNBOOK_BIN, NO_INSTALL):
#   SIZE             input bytes for head -c (default 768M: 1.09 GB of base64 out)
#   RUNS             runs per tool, the median is reported (default 3)
#   TOOLS            which to run (default "pipe make ninja runbook")
#   GOAL_RATIO       runbook / make throughput to reach (default 0.6)
#   RSS_GOAL_MIB     runbook's peak RSS limit (default 32)
#   EVIDENCE_PARENT  where bundles and outputs go (default a temp dir under /tmp)
#   RUNBOOK_BEFORE   a second runbook binary (an older build), run as tool "before" when
#                    TOOLS names it: before/after figures in the same run
#
# Example: the redaction figure in bench/README.md
#   SIZE=200M RUNS=5 TOOLS=runbook bench/capture.sh
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZE="${SIZE:-768M}"
RUNS="${RUNS:-3}"
TOOLS="${TOOLS:-pipe make ninja runbook}"
GOAL_RATIO="${GOAL_RATIO:-0.6}"
RSS_GOAL_MIB="${RSS_GOAL_MIB:-32}"

ensure_tools make:make ninja:ninja-build /usr/bin/time:time
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is needed for CPU and RSS figures"
case " $TOOLS " in *" runbook "*) resolve_runbook_bin ;; esac

WORK="$(mktemp -d "${EVIDENCE_PARENT:-/tmp}/rb-capture.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
PRODUCER="head -c $SIZE /dev/zero | base64"

cat >"$WORK/Makefile" <<EOF
all:
	@$PRODUCER
EOF
cat >"$WORK/build.ninja" <<EOF
rule produce
  command = $PRODUCER
build out: produce
EOF
cat >"$WORK/capture.toml" <<EOF
[runbook]
name = "capture"

[params]
token = { secret = true, env = "CAPTURE_TOKEN" }

[[steps]]
id = "produce"
run = '$PRODUCER'
EOF

# run_once TOOL: prints "wall cpu rss_kib" for one run.
run_once() {
  local tool="$1" t="$WORK/time" out="$WORK/out"
  rm -rf "$WORK/proof" "$WORK/.ninja_log" "$out"
  case "$tool" in
    pipe) /usr/bin/time -o "$t" -f '%e %U %S %M' sh -c "$PRODUCER | cat > '$out'" ;;
    make) (cd "$WORK" && /usr/bin/time -o "$t" -f '%e %U %S %M' make -s -f Makefile >"$out") ;;
    ninja) (cd "$WORK" && /usr/bin/time -o "$t" -f '%e %U %S %M' ninja -f build.ninja >"$out") ;;
    runbook | before)
      local bin="$RUNBOOK_BIN"
      [[ "$tool" == before ]] && bin="${RUNBOOK_BEFORE:?RUNBOOK_BEFORE names the binary for tool before}"
      # A binary-digest cache of each build's own (an older build reads only one entry and
      # rewrites the file: alternating runs would re-hash 124 MB each time); the first run of
      # each build hashes it, the median leaves that out.
      (cd "$WORK" && XDG_CACHE_HOME="$WORK/cache-$tool" CAPTURE_TOKEN="capture-secret-value-0123456789" /usr/bin/time -o "$t" \
        -f '%e %U %S %M' "$bin" run capture.toml --evidence-dir proof --no-progress \
        >/dev/null 2>"$WORK/runbook.err") || { cat "$WORK/runbook.err" >&2; die "runbook run failed"; }
      ;;
  esac
  awk '{ printf "%s %.2f %s\n", $1, $2 + $3, $4 }' "$t"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# Output size: what the producer writes (the same for every tool).
BYTES="$(sh -c "$PRODUCER" | wc -c)"
log "capture: $BYTES bytes of base64 per run, $RUNS run(s) per tool, tools: $TOOLS"

# Round robin: run i of every tool, then run i + 1 of every tool, so that a change in the
# machine's load during the benchmark falls on all tools alike (before/after figures above all).
declare -A WALL CPU RSS ROWS
for ((i = 0; i < RUNS; i++)); do
  for tool in $TOOLS; do
    row="$(run_once "$tool")"
    ROWS[$tool]+="$row"$'\n'
    log "  $tool run $((i + 1)): $row"
  done
done
for tool in $TOOLS; do
  WALL[$tool]="$(printf '%s' "${ROWS[$tool]}" | awk '{ print $1 }' | median)"
  CPU[$tool]="$(printf '%s' "${ROWS[$tool]}" | awk '{ print $2 }' | median)"
  RSS[$tool]="$(printf '%s' "${ROWS[$tool]}" | awk '{ print $3 }' | median)"
done

base_cpu="${CPU[pipe]:-}"
printf '%-8s %9s %10s %8s %12s %10s %9s\n' tool wall_s MB/s cpu_s cpu_over_pipe rss_MiB vs_make
for tool in $TOOLS; do
  mbs="$(awk -v b="$BYTES" -v w="${WALL[$tool]}" 'BEGIN { if (w < 0.01) w = 0.01; printf "%.0f", b / 1e6 / w }')"
  over="-"
  [[ -n "$base_cpu" ]] && over="$(awk -v c="${CPU[$tool]}" -v p="$base_cpu" 'BEGIN { printf "%+.2f", c - p }')"
  ratio="-"
  [[ -n "${WALL[make]:-}" ]] && ratio="$(awk -v m="${WALL[make]}" -v w="${WALL[$tool]}" 'BEGIN { if (m < 0.01) m = 0.01; if (w < 0.01) w = 0.01; printf "%.2fx", m / w }')"
  printf '%-8s %9s %10s %8s %12s %10.1f %9s\n' "$tool" "${WALL[$tool]}" "$mbs" "${CPU[$tool]}" \
    "$over" "$(awk -v k="${RSS[$tool]}" 'BEGIN { print k / 1024 }')" "$ratio"
done

status=0
if [[ -n "${WALL[runbook]:-}" ]]; then
  rss_mib="$(awk -v k="${RSS[runbook]}" 'BEGIN { printf "%.1f", k / 1024 }')"
  if awk -v k="${RSS[runbook]}" -v g="$RSS_GOAL_MIB" 'BEGIN { exit !(k / 1024 > g) }'; then
    log "GOAL MISSED: runbook peak RSS ${rss_mib} MiB > ${RSS_GOAL_MIB} MiB"
    status=1
  fi
  if [[ -n "${WALL[make]:-}" ]]; then
    if awk -v m="${WALL[make]}" -v w="${WALL[runbook]}" -v g="$GOAL_RATIO" 'BEGIN { if (m < 0.01) m = 0.01; if (w < 0.01) w = 0.01; exit !(m / w < g) }'; then
      log "GOAL MISSED: runbook throughput $(awk -v m="${WALL[make]}" -v w="${WALL[runbook]}" 'BEGIN { if (m < 0.01) m = 0.01; if (w < 0.01) w = 0.01; printf "%.2f", m / w }')x make's < ${GOAL_RATIO}x"
      status=1
    else
      log "goal met: runbook >= ${GOAL_RATIO}x make's throughput"
    fi
  fi
fi
exit "$status"
