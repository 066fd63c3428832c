#!/usr/bin/env bash
# What the write-ahead journal costs per step: two runbook binaries, BEFORE (a build without
# write-ahead, e.g. of 818be95^) and AFTER (this tree), each run on the same 1000-step no-op
# DAGs, wide and chain, with --parallel 2, their evidence on this disk and on a tmpfs. Both
# write the full bundle. Reported per step: wall time and CPU time (user + system of runbook
# and its children, which the load of other work on the machine disturbs far less than wall
# time), and the ratio AFTER / BEFORE. Exits non-zero when AFTER's CPU per step on any DAG is
# more than GOAL times BEFORE's.
#
# Usage: BEFORE=/path/to/old/runbook AFTER=target/release/runbook bench/write-ahead-cost.sh
# Env:   STEPS (1000), RUNS (3, the median is kept), GOAL (1.25), TMPFS=0 to skip the tmpfs
#        (it needs root to mount one; skipped with a note otherwise)
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STEPS="${STEPS:-1000}"
RUNS="${RUNS:-3}"
GOAL="${GOAL:-1.25}"
: "${BEFORE:?set BEFORE to the runbook binary without write-ahead}"
: "${AFTER:?set AFTER to the runbook binary to measure}"
[[ -x "$BEFORE" && -x "$AFTER" ]] || die "BEFORE and AFTER must be executable files"
[[ -x /usr/bin/time ]] || die "needs /usr/bin/time (apt-get install time)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/runbook-wa-cost.XXXXXX")"
TMPFS_DIR="$WORK/tmpfs"
cleanup() {
  mountpoint -q "$TMPFS_DIR" 2>/dev/null && umount "$TMPFS_DIR"
  rm -rf "$WORK"
}
trap cleanup EXIT

for shape in wide chain; do
  mkdir -p "$WORK/$shape"
  case "$shape" in
    wide) gen_wide "$STEPS" ;;
    chain) gen_chain "$STEPS" ;;
  esac | emit_toml "$shape" >"$WORK/$shape/runbook.toml"
done

places=(disk)
mkdir -p "$TMPFS_DIR"
if [[ "${TMPFS:-1}" == 1 ]] && [[ "$(id -u)" == 0 ]] && mount -t tmpfs -o size=2g tmpfs "$TMPFS_DIR" 2>/dev/null; then
  places+=(tmpfs)
else
  log "no tmpfs (needs root, or TMPFS=0): measuring on disk only"
fi

# One timed run: prints "wall_seconds cpu_seconds" (cpu = user + sys of runbook and children).
# Every run writes into a directory of its own, all removed only at exit: on ext4, creating
# files right after deleting thousands makes the inode allocator skip each recently deleted
# inode (`recently_deleted` in the kernel profile), a cost that would land on whichever
# binary runs after the deletions, not on the one that causes them.
RUN_NO=0
one() {
  local bin="$1" shape="$2" base="$3"
  RUN_NO=$((RUN_NO + 1))
  local evid="$base/evidence-$RUN_NO"
  /usr/bin/time -o "$WORK/time" -f '%e %U %S' "$bin" run "$WORK/$shape/runbook.toml" \
    --parallel 2 --evidence-dir "$evid" --no-progress >/dev/null 2>&1 ||
    die "$bin failed on the $shape DAG"
  awk '{ printf "%.4f %.4f\n", $1, $2 + $3 }' "$WORK/time"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

log "$(machine_summary)"
log "before: $BEFORE ($("$BEFORE" --version)); after: $AFTER ($("$AFTER" --version))"
BUSY_BEFORE="$(warn_if_busy)"
declare -A wall cpu
for place in "${places[@]}"; do
  base="$WORK"
  [[ "$place" == tmpfs ]] && base="$TMPFS_DIR"
  for shape in wide chain; do
    one "$BEFORE" "$shape" "$base" >/dev/null # warm-ups, untimed
    one "$AFTER" "$shape" "$base" >/dev/null
    : >"$WORK/samples.before"
    : >"$WORK/samples.after"
    # Interleaved, so drift in the machine's load or the disk's state hits both alike.
    for ((r = 0; r < RUNS; r++)); do
      one "$BEFORE" "$shape" "$base" >>"$WORK/samples.before"
      one "$AFTER" "$shape" "$base" >>"$WORK/samples.after"
    done
    for which in before after; do
      wall[$place.$shape.$which]="$(awk '{ print $1 }' "$WORK/samples.$which" | median)"
      cpu[$place.$shape.$which]="$(awk '{ print $2 }' "$WORK/samples.$which" | median)"
    done
  done
done

echo
machine_summary
echo "$STEPS no-op steps, --parallel 2, full evidence; median of $RUNS runs after 1 warm-up"
echo "CPU busy with other work, 1 s sample: before ${BUSY_BEFORE}%, after $(cpu_busy_pct)%"
echo
printf '%-6s %-6s | %12s %12s %7s | %12s %12s %7s | %s\n' place dag "wall ms/st" "" "" "cpu ms/st" "" "" ""
printf '%-6s %-6s | %12s %12s %7s | %12s %12s %7s | %s\n' "" "" before after ratio before after ratio "cpu goal <= ${GOAL}x"
verdict=met
for place in "${places[@]}"; do
  for shape in wide chain; do
    line="$(awk -v n="$STEPS" -v g="$GOAL" \
      -v wb="${wall[$place.$shape.before]}" -v wa="${wall[$place.$shape.after]}" \
      -v cb="${cpu[$place.$shape.before]}" -v ca="${cpu[$place.$shape.after]}" 'BEGIN {
        cr = (cb > 0 && ca > 0) ? ca / cb : -1
        printf "%12.3f %12.3f %6.2fx | %12.3f %12.3f %6.2fx | %s",
          wb * 1000 / n, wa * 1000 / n, (wb > 0) ? wa / wb : 0,
          cb * 1000 / n, ca * 1000 / n, cr, (cr > 0 && cr <= g) ? "met" : "NOT met" }')"
    printf '%-6s %-6s | %s\n' "$place" "$shape" "$line"
    [[ "$line" == *"NOT met"* ]] && verdict="NOT met"
  done
done
echo
echo "goal (write-ahead costs at most ${GOAL}x the CPU per step of the build without it): $verdict"
[[ "$verdict" == met ]]
