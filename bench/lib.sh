# shellcheck shell=bash
# Helpers shared by the bench/ scripts: locating the runbook binary, making sure the timing
# tools exist, generating synthetic DAGs and timing commands. Source it; do not run it.
#
# Environment:
#   RUNBOOK_BIN   path to a built runbook binary; when unset the scripts run
#                 `cargo build --release` in the repository and use target/release/runbook
#                 (or $CARGO_TARGET_DIR/release/runbook when CARGO_TARGET_DIR is set)
#   WARMUP, RUNS  hyperfine --warmup / --runs (defaults set by each script)
#   NO_HYPERFINE  set to 1 to force the date +%s.%N fallback loop
#   NO_INSTALL    set to 1 to never call apt-get

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_DIR/.." && pwd)"

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Sets RUNBOOK_BIN to an executable runbook binary, building one if needed.
resolve_runbook_bin() {
  if [[ -n "${RUNBOOK_BIN:-}" ]]; then
    [[ -x "$RUNBOOK_BIN" ]] || die "RUNBOOK_BIN=$RUNBOOK_BIN is not an executable file"
  else
    log "RUNBOOK_BIN not set: building with cargo build --release"
    (cd "$REPO_ROOT" && cargo build --release --bin runbook >&2)
    RUNBOOK_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/runbook"
    [[ -x "$RUNBOOK_BIN" ]] || die "build finished but $RUNBOOK_BIN does not exist"
  fi
  # Absolute, because the timed commands run from other directories.
  RUNBOOK_BIN="$(cd "$(dirname "$RUNBOOK_BIN")" && pwd)/$(basename "$RUNBOOK_BIN")"
  export RUNBOOK_BIN
}

# ensure_tools TOOL:PACKAGE... — installs missing tools with apt-get (one `apt-get update`
# at most, and only if the first install attempt fails). Tools that stay missing are reported
# by the caller; hyperfine is optional (there is a fallback loop).
ensure_tools() {
  local missing=() spec tool pkg
  for spec in "$@"; do
    tool="${spec%%:*}"; pkg="${spec#*:}"
    command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if [[ "${NO_INSTALL:-0}" == 1 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing packages (not installing): ${missing[*]}"
    return 0
  fi
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { log "missing packages and no root: ${missing[*]}"; return 0; }
    sudo=(sudo -n)
  fi
  log "installing: ${missing[*]}"
  if ! "${sudo[@]}" apt-get install -y "${missing[@]}" >&2; then
    "${sudo[@]}" apt-get update >&2 || true
    "${sudo[@]}" apt-get install -y "${missing[@]}" >&2 || log "could not install: ${missing[*]}"
  fi
}

have_hyperfine() {
  [[ "${NO_HYPERFINE:-0}" != 1 ]] && command -v hyperfine >/dev/null 2>&1
}

# ---------------------------------------------------------------------------------------------
# DAG generation. A DAG is an "edge list": one line per step, `id need1 need2 ...`, in an order
# where every step comes after the steps it needs. Emitters turn it into each tool's format.

# gen_chain N: s0000 <- s0001 <- ... (each step needs the previous one)
gen_chain() {
  awk -v n="$1" 'BEGIN { for (i = 0; i < n; i++) { if (i) printf "s%05d s%05d\n", i, i - 1; else printf "s%05d\n", i } }'
}

# gen_wide N: N independent steps
gen_wide() {
  awk -v n="$1" 'BEGIN { for (i = 0; i < n; i++) printf "s%05d\n", i }'
}

# gen_layered LAYERS WIDTH: step i of layer L>0 needs steps i and i+1 of layer L-1, and for
# even i also step i+37 (all modulo WIDTH): 2 or 3 needs each, deterministic.
gen_layered() {
  awk -v layers="$1" -v w="$2" 'BEGIN {
    for (l = 0; l < layers; l++)
      for (i = 0; i < w; i++) {
        line = sprintf("l%03d-s%03d", l, i)
        if (l > 0) {
          line = line sprintf(" l%03d-s%03d", l - 1, i)
          if (w > 1) line = line sprintf(" l%03d-s%03d", l - 1, (i + 1) % w)
          if (i % 2 == 0 && w > 37) line = line sprintf(" l%03d-s%03d", l - 1, (i + 37) % w)
        }
        print line
      }
  }'
}

# emit_toml NAME < edges > runbook.toml
emit_toml() {
  awk -v name="$1" 'BEGIN {
      printf "[runbook]\nname = \"%s\"\n\n[defaults]\nshell = \"sh -c\"\n", name
    }
    {
      printf "\n[[steps]]\nid = \"%s\"\n", $1
      if (NF > 1) {
        printf "needs = ["
        for (i = 2; i <= NF; i++) printf "%s\"%s\"", (i > 2 ? ", " : ""), $i
        printf "]\n"
      }
      printf "run = \"true\"\n"
    }'
}

# emit_ninja < edges > build.ninja — outputs are never created, so every edge is dirty on
# every invocation and ninja runs all N commands each time (checked by verify_counts).
emit_ninja() {
  awk 'BEGIN { printf "rule noop\n  command = true\n\n" }
    {
      printf "build %s: noop", $1
      if (NF > 1) { printf " |"; for (i = 2; i <= NF; i++) printf " %s", $i }
      printf "\n"
    }'
}

# emit_make < edges > Makefile — every target is .PHONY, so make runs every recipe each time.
emit_make() {
  awk '{ ids[NR] = $1; line[NR] = $0 }
    END {
      printf ".PHONY: all"
      for (i = 1; i <= NR; i++) printf " %s", ids[i]
      printf "\n\nall:"
      for (i = 1; i <= NR; i++) printf " %s", ids[i]
      printf "\n"
      for (i = 1; i <= NR; i++) {
        n = split(line[i], f, " ")
        printf "\n%s:", f[1]
        for (j = 2; j <= n; j++) printf " %s", f[j]
        printf "\n\ttrue\n"
      }
    }'
}

# ---------------------------------------------------------------------------------------------
# Timing. measure NAME PREPARE COMMAND... prints "mean_ms stddev_ms min_ms max_ms user_ms sys_ms"
# on stdout; the last two are the mean CPU time of the command and the children it waited for
# (hyperfine's figures; "-" with the fallback loop).
# PREPARE (may be empty) is a command line run before every timed run, untimed.

measure() {
  local name="$1" prepare="$2"; shift 2
  local warmup="${WARMUP:-1}" runs="${RUNS:-5}"
  if have_hyperfine; then
    local cmd csv
    cmd="$(printf '%q ' "$@")"
    csv="$(mktemp)"
    local args=(-N --style none --warmup "$warmup" --runs "$runs" --export-csv "$csv" -n "$name")
    [[ -n "$prepare" ]] && args+=(--prepare "$prepare")
    if ! hyperfine "${args[@]}" "$cmd" >&2; then
      rm -f "$csv"; die "hyperfine failed for $name"
    fi
    # command,mean,stddev,median,user,system,min,max  (seconds)
    awk -F, 'NR == 2 { printf "%.1f %.1f %.1f %.1f %.1f %.1f\n", $2 * 1000, $3 * 1000, $7 * 1000, $8 * 1000, $5 * 1000, $6 * 1000 }' "$csv"
    rm -f "$csv"
  else
    local i t0 t1 times=()
    for ((i = 0; i < warmup + runs; i++)); do
      [[ -n "$prepare" ]] && eval "$prepare"
      t0="$(date +%s.%N)"
      "$@" >/dev/null 2>&1 || die "$name failed"
      t1="$(date +%s.%N)"
      ((i >= warmup)) && times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) * 1000 }')")
    done
    printf '%s\n' "${times[@]}" | awk '{ s += $1; ss += $1 * $1; if (NR == 1 || $1 < mn) mn = $1; if ($1 > mx) mx = $1 }
      END { m = s / NR; v = (NR > 1) ? (ss - NR * m * m) / (NR - 1) : 0; if (v < 0) v = 0
            printf "%.1f %.1f %.1f %.1f - -\n", m, sqrt(v), mn, mx }'
    log "  $name: $(printf '%s ' "${times[@]}")ms"
  fi
}

# Percentage of CPU time that was busy over one second (0-100), from /proc/stat. The figures
# are only meaningful on an otherwise idle machine; the scripts print this before and after.
cpu_busy_pct() {
  local a b
  a="$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat 2>/dev/null)" || { echo "?"; return; }
  sleep 1
  b="$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)"
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; idle = y[2] - x[2]
    printf "%.0f", (busy + idle > 0) ? 100 * busy / (busy + idle) : 0 }'
}

warn_if_busy() {
  local pct
  pct="$(cpu_busy_pct)"
  if [[ "$pct" != "?" ]] && ((pct > 10)); then
    log "WARNING: the CPU was ${pct}% busy before starting (other processes?): figures will be skewed"
  fi
  echo "$pct"
}

machine_summary() {
  local cpu
  cpu="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)"
  printf 'date: %s  cores: %s  cpu: %s\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "${cpu:-unknown}"
}
