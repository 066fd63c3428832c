#!/usr/bin/env bash
# How `runbook check` and `runbook plan` scale with the number of steps.
#
# Main figure: `runbook check` on a 10,000-step layered DAG (100 layers of 100 steps, each
# step needing 2-3 steps of the previous layer; ~25,000 needs edges). Target: < 200 ms.
# `runbook plan` on the same file is timed too (it also renders every step's command).
# Then both are timed at several sizes (SIZES) to show whether the cost grows linearly:
# the ms/step column should stay flat.
#
# Usage: bench/check-scale.sh            (RUNBOOK_BIN=/path/to/runbook to skip the build)
# Env:   STEPS (10000), TARGET_MS (200), WARMUP (2), RUNS (10),
#        SIZES ("1000 2500 5000 10000 20000", multiples of 100; SIZES= to skip),
#        KEEP_TMP=1 to keep the generated files
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STEPS="${STEPS:-10000}"
TARGET_MS="${TARGET_MS:-200}"
SIZES="${SIZES-1000 2500 5000 10000 20000}"
export WARMUP="${WARMUP:-2}" RUNS="${RUNS:-10}"

ensure_tools hyperfine:hyperfine
have_hyperfine || log "hyperfine not available: using a date +%s.%N loop"
resolve_runbook_bin

WORK="$(mktemp -d "${TMPDIR:-/tmp}/runbook-check-scale.XXXXXX")"
if [[ "${KEEP_TMP:-0}" == 1 ]]; then
  log "keeping generated files in $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi

# runbook_file N -> path of a generated N-step layered runbook (N/100 layers of 100)
runbook_file() {
  local n="$1" f="$WORK/layered-$1.toml"
  ((n % 100 == 0 && n > 0)) || die "step counts must be multiples of 100 (got $n)"
  if [[ ! -f "$f" ]]; then
    gen_layered $((n / 100)) 100 | emit_toml "layered-$n" >"$f"
    local out
    out="$("$RUNBOOK_BIN" check "$f" 2>&1)" || die "generated $f does not check: $out"
    [[ "$out" == *"ok ($n steps)"* ]] || die "unexpected check output: $out"
  fi
  echo "$f"
}

BUSY_BEFORE="$(warn_if_busy)"
log "$(machine_summary)"
log "runbook: $RUNBOOK_BIN ($("$RUNBOOK_BIN" --version))"

main="$(runbook_file "$STEPS")"
edges="$(awk -F'"' '/^needs/ { n += (NF - 1) / 2 } END { print n + 0 }' "$main")"
log "main file: $main ($STEPS steps, $(wc -c <"$main") bytes)"
log "timing runbook check and runbook plan, warmup $WARMUP, runs $RUNS"
read -r check_mean check_sd check_min check_max _ <<<"$(measure "check-$STEPS" "" "$RUNBOOK_BIN" check "$main")"
read -r plan_mean plan_sd plan_min plan_max _ <<<"$(measure "plan-$STEPS" "" "$RUNBOOK_BIN" plan "$main")"

declare -A scale_check scale_plan
for n in $SIZES; do
  f="$(runbook_file "$n")"
  if [[ "$n" == "$STEPS" ]]; then
    scale_check[$n]="$check_mean"; scale_plan[$n]="$plan_mean"; continue
  fi
  log "timing size $n"
  # Fewer runs for the scaling sweep: it is about the trend, not the last millisecond.
  scale_check[$n]="$(WARMUP=1 RUNS=5 measure "check-$n" "" "$RUNBOOK_BIN" check "$f" | awk '{ print $1 }')"
  scale_plan[$n]="$(WARMUP=1 RUNS=5 measure "plan-$n" "" "$RUNBOOK_BIN" plan "$f" | awk '{ print $1 }')"
done

echo
machine_summary
echo "CPU busy with other work, 1 s sample: before ${BUSY_BEFORE}%, after $(cpu_busy_pct)% (should be ~0)"
echo "layered DAG, $STEPS steps ($((STEPS / 100)) layers x 100), $edges needs edges; mean ± sd of $RUNS runs after $WARMUP warm-up"
echo
printf '%-22s %10s %8s %10s %10s\n' command "mean ms" "sd ms" "min ms" "max ms"
printf '%-22s %10s %8s %10s %10s\n' "runbook check" "$check_mean" "$check_sd" "$check_min" "$check_max"
printf '%-22s %10s %8s %10s %10s\n' "runbook plan" "$plan_mean" "$plan_sd" "$plan_min" "$plan_max"
echo
if awk -v m="$check_mean" -v t="$TARGET_MS" 'BEGIN { exit !(m < t) }'; then
  result=PASS
else
  result=FAIL
fi
echo "runbook check on $STEPS steps: $check_mean ms (target < $TARGET_MS ms): $result"

if [[ -n "$SIZES" ]]; then
  echo
  echo "scaling (mean ms; ms/step should stay flat if the cost is linear):"
  printf '%8s | %10s %12s | %10s %12s\n' steps "check ms" "check ms/st" "plan ms" "plan ms/st"
  for n in $SIZES; do
    awk -v n="$n" -v c="${scale_check[$n]}" -v p="${scale_plan[$n]}" \
      'BEGIN { printf "%8d | %10.1f %12.4f | %10.1f %12.4f\n", n, c, c / n, p, p / n }'
  done
fi

[[ "$result" == PASS ]]
