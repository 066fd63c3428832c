#!/usr/bin/env bash
# Per-step scheduling overhead of `runbook run` against ninja and make, on three 1000-step
# no-op DAGs (every step runs `true`):
#   chain    each step needs the previous one (no parallelism at all)
#   wide     1000 independent steps
#   layered  10 layers of 100; each step needs 2-3 steps of the previous layer
# All three tools run with 2-way parallelism (runbook --parallel 2, ninja -j2, make -j2).
# runbook writes an evidence bundle on every run; that is part of what is measured.
#
# The goal (#19) is a per-step overhead of at most 1.0x ninja's (GOAL=…). Two figures are reported:
#   gross     wall time / steps
#   marginal  (wall time - wall time of a 1-step DAG) / (steps - 1), i.e. without process
#             start-up and file parsing that every run pays once
#
# Exits 1 when the goal is missed in any shape.
#
# Usage: bench/dag-overhead.sh            (RUNBOOK_BIN=/path/to/runbook to skip the build)
# Env:   STEPS (default 1000; layered uses STEPS/100 layers of 100), WARMUP (1), RUNS (5), GOAL (1.0),
#        SHAPES ("chain wide layered"), KEEP_TMP=1 to keep the generated files,
#        EVIDENCE_PARENT=DIR to put runbook's evidence bundles somewhere else (e.g. a tmpfs),
#        RUNBOOK_BEFORE=/path/to/other/runbook to time a second build too, shape by shape just
#        before RUNBOOK_BIN (so load that changes during the run falls on both), with a
#        before/after table at the end
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STEPS="${STEPS:-1000}"
SHAPES="${SHAPES:-chain wide layered}"
export WARMUP="${WARMUP:-1}" RUNS="${RUNS:-5}"
JOBS=2
GOAL="${GOAL:-1.0}"

((STEPS % 100 == 0 && STEPS >= 200)) || die "STEPS must be a multiple of 100, at least 200"

ensure_tools hyperfine:hyperfine ninja:ninja-build make:make
command -v ninja >/dev/null || die "ninja is required (apt-get install ninja-build)"
command -v make >/dev/null || die "make is required"
have_hyperfine || log "hyperfine not available: using a date +%s.%N loop"
resolve_runbook_bin
if [[ -n "${RUNBOOK_BEFORE:-}" ]]; then
  [[ -x "$RUNBOOK_BEFORE" ]] || die "RUNBOOK_BEFORE=$RUNBOOK_BEFORE is not an executable file"
  RUNBOOK_BEFORE="$(cd "$(dirname "$RUNBOOK_BEFORE")" && pwd)/$(basename "$RUNBOOK_BEFORE")"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/runbook-dag-overhead.XXXXXX")"
if [[ "${KEEP_TMP:-0}" == 1 ]]; then
  log "keeping generated files in $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
EVID_PARENT="${EVIDENCE_PARENT:-$WORK}"
if [[ -n "${EVIDENCE_PARENT:-}" ]]; then
  # Bundles written under EVIDENCE_PARENT are removed at exit too.
  EVID_PARENT="$(mktemp -d "$EVIDENCE_PARENT/runbook-dag-overhead.XXXXXX")"
  [[ "${KEEP_TMP:-0}" == 1 ]] || trap 'rm -rf "$WORK" "$EVID_PARENT"' EXIT
fi

edges() {
  case "$1" in
    chain) gen_chain "$STEPS" ;;
    wide) gen_wide "$STEPS" ;;
    layered) gen_layered $((STEPS / 100)) 100 ;;
    one) gen_wide 1 ;;
    *) die "unknown shape $1" ;;
  esac
}

# Generates $WORK/<shape>/{runbook.toml,build.ninja,Makefile}.
generate() {
  local shape="$1" dir="$WORK/$1"
  mkdir -p "$dir"
  edges "$shape" >"$dir/edges.txt"
  emit_toml "$shape" <"$dir/edges.txt" >"$dir/runbook.toml"
  emit_ninja <"$dir/edges.txt" >"$dir/build.ninja"
  emit_make <"$dir/edges.txt" >"$dir/Makefile"
}

# rb_cmd SHAPE [BINARY [TAG]]
rb_cmd() { echo "${2:-$RUNBOOK_BIN}" run "$WORK/$1/runbook.toml" --parallel "$JOBS" --evidence-dir "$EVID_PARENT/evidence${3:-}-$1" --no-progress; }

# Runs every tool once (twice for ninja and make) outside the timing, and checks that each
# really ran every step: a tool that skipped work would look fast for the wrong reason.
verify_counts() {
  local shape="$1" dir="$WORK/$1" n got
  n="$(wc -l <"$dir/edges.txt")"
  "$RUNBOOK_BIN" check "$dir/runbook.toml" 2>/dev/null || die "$shape: runbook check failed"
  got="$("$RUNBOOK_BIN" run "$dir/runbook.toml" --parallel "$JOBS" --evidence-dir "$dir/verify-evidence" \
    --no-progress --json 2>/dev/null | awk '/"status": "succeeded"/ { c++ } END { print c - 1 }')"
  [[ "$got" == "$n" ]] || die "$shape: runbook ran $got of $n steps"
  local pass
  for pass in 1 2; do
    got="$(ninja -C "$dir" -j"$JOBS" | grep -c '^\[[0-9]*/[0-9]*\]' || true)"
    [[ "$got" == "$n" ]] || die "$shape: ninja pass $pass ran $got of $n commands"
    got="$(make -C "$dir" -j"$JOBS" --no-print-directory | grep -cx 'true' || true)"
    [[ "$got" == "$n" ]] || die "$shape: make pass $pass ran $got of $n recipes"
  done
  log "$shape: verified runbook, ninja and make each run all $n steps"
}

# results[shape.tool] = "mean sd min max"
declare -A results

bench_shape() {
  local shape="$1" dir="$WORK/$1" rb
  read -r -a rb <<<"$(rb_cmd "$shape")"
  log "timing $shape ($(wc -l <"$dir/edges.txt") steps), warmup $WARMUP, runs $RUNS"
  # No evidence is deleted between runs (each run writes a bundle directory of its own; all
  # go at exit): on ext4, creating files right after deleting thousands makes the inode
  # allocator skip each recently deleted inode (`recently_deleted` in a kernel profile), a
  # cost that is the benchmark's, not runbook's.
  if [[ -n "${RUNBOOK_BEFORE:-}" ]]; then
    local before
    read -r -a before <<<"$(rb_cmd "$shape" "$RUNBOOK_BEFORE" -before)"
    results[$shape.before]="$(measure "before-$shape" "" "${before[@]}")"
  fi
  results[$shape.runbook]="$(measure "runbook-$shape" "" "${rb[@]}")"
  results[$shape.ninja]="$(measure "ninja-$shape" "" ninja -C "$dir" -j"$JOBS")"
  results[$shape.make]="$(measure "make-$shape" "" make -C "$dir" -j"$JOBS" --no-print-directory)"
}

BUSY_BEFORE="$(warn_if_busy)"
log "$(machine_summary)"
log "runbook: $RUNBOOK_BIN ($("$RUNBOOK_BIN" --version))"
[[ -n "${RUNBOOK_BEFORE:-}" ]] && log "before: $RUNBOOK_BEFORE ($("$RUNBOOK_BEFORE" --version))"
log "ninja $(ninja --version), $(make --version | head -n1), $(hyperfine --version 2>/dev/null || echo 'no hyperfine')"
log "work dir: $WORK, evidence under: $EVID_PARENT"

generate one
verify_counts one
bench_shape one
for shape in $SHAPES; do
  generate "$shape"
  verify_counts "$shape"
  bench_shape "$shape"
done

mean() { awk '{ print $1 }' <<<"${results[$1]}"; }
sd() { awk '{ print $2 }' <<<"${results[$1]}"; }
fastest() { awk '{ print $3 }' <<<"${results[$1]}"; }

echo
machine_summary
echo "runbook --parallel $JOBS (evidence on $(df -T "$EVID_PARENT" | awk 'NR == 2 { print $2 }')), ninja -j$JOBS, make -j$JOBS; mean ± sd of $RUNS runs after $WARMUP warm-up"
echo "CPU busy with other work, 1 s sample: before ${BUSY_BEFORE}%, after $(cpu_busy_pct)% (should be ~0)"
echo
printf '%-8s %6s | %16s %16s %16s | %10s %10s %10s | %8s\n' \
  shape steps "runbook ms" "ninja ms" "make ms" "rb ms/st" "nj ms/st" "mk ms/st" "rb/ninja"
for shape in one $SHAPES; do
  n=$([[ $shape == one ]] && echo 1 || echo "$STEPS")
  awk -v s="$shape" -v n="$n" \
    -v rm="$(mean "$shape.runbook")" -v rs="$(sd "$shape.runbook")" \
    -v nm="$(mean "$shape.ninja")" -v ns="$(sd "$shape.ninja")" \
    -v mm="$(mean "$shape.make")" -v ms="$(sd "$shape.make")" 'BEGIN {
      printf "%-8s %6d | %8.1f ± %5.1f %8.1f ± %5.1f %8.1f ± %5.1f | %10.3f %10.3f %10.3f | %7.2fx\n",
        s, n, rm, rs, nm, ns, mm, ms, rm / n, nm / n, mm / n, rm / nm }'
done

echo
echo "marginal per-step overhead, (T(shape) - T(1 step)) / (steps - 1), from the means;"
echo "the last ratio uses each tool's fastest run instead (less sensitive to a noisy machine):"
printf '%-8s | %10s %10s %10s | %8s | %-14s | %s\n' shape "rb ms/st" "nj ms/st" "mk ms/st" "rb/ninja" "goal <= ${GOAL}x" "rb/ninja (fastest runs)"
verdict=met
for shape in $SHAPES; do
  line="$(awk -v n="$STEPS" -v g="$GOAL" \
    -v r1="$(mean one.runbook)" -v n1="$(mean one.ninja)" -v m1="$(mean one.make)" \
    -v r="$(mean "$shape.runbook")" -v nj="$(mean "$shape.ninja")" -v mk="$(mean "$shape.make")" \
    -v fr1="$(fastest one.runbook)" -v fn1="$(fastest one.ninja)" \
    -v fr="$(fastest "$shape.runbook")" -v fn="$(fastest "$shape.ninja")" 'BEGIN {
      rp = (r - r1) / (n - 1); np = (nj - n1) / (n - 1); mp = (mk - m1) / (n - 1)
      ratio = (np > 0) ? rp / np : 0
      fp = (fn - fn1 > 0) ? (fr - fr1) / (fn - fn1) : 0
      printf "%10.3f %10.3f %10.3f | %7.2fx | %-14s | %7.2fx", rp, np, mp, ratio,
        (np > 0 && ratio <= g) ? "met" : "NOT met", fp }')"
  printf '%-8s | %s\n' "$shape" "$line"
  [[ "$line" == *"NOT met"* ]] && verdict="NOT met"
done
if [[ -n "${RUNBOOK_BEFORE:-}" ]]; then
  echo
  echo "before ($RUNBOOK_BEFORE) and after ($RUNBOOK_BIN), timed one after the other per shape;"
  echo "marginal ms/step from the means, and each one's ratio to ninja's in the same shape:"
  printf '%-8s | %10s %10s %10s | %10s %10s\n' shape "before" "after" "ninja" "before/nj" "after/nj"
  for shape in $SHAPES; do
    awk -v n="$STEPS" \
      -v b1="$(mean one.before)" -v r1="$(mean one.runbook)" -v n1="$(mean one.ninja)" \
      -v b="$(mean "$shape.before")" -v r="$(mean "$shape.runbook")" -v nj="$(mean "$shape.ninja")" \
      -v s="$shape" 'BEGIN {
        bp = (b - b1) / (n - 1); rp = (r - r1) / (n - 1); np = (nj - n1) / (n - 1)
        printf "%-8s | %10.3f %10.3f %10.3f | %9.2fx %9.2fx\n", s, bp, rp, np,
          (np > 0) ? bp / np : 0, (np > 0) ? rp / np : 0 }'
  done
fi
echo
echo "goal (runbook per-step overhead <= ${GOAL}x ninja's, marginal, every shape): $verdict"
# A missed goal is the exit status, so a regression is one command away (#19).
[[ "$verdict" == met ]]
