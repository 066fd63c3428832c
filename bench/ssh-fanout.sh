#!/usr/bin/env bash
# Fan-out of one trivial command (`true`) to N hosts over SSH: runbook against parallel-ssh,
# an OpenSSH ControlMaster loop and Ansible. The hosts are N real OpenSSH sshd instances on
# 127.0.0.1 (each with its own port, host key, config and log, in a temporary directory, as
# steps/tests/support/sshd.rs does); nothing connects anywhere but 127.0.0.1.
#
#   runbook        `runbook run` of a one-step runbook: on = "all", strategy = { parallel = 50 },
#                  --forks 50. Fresh connections every run (one per host), plus a full evidence
#                  bundle, as a real run would write.
#   pssh           `parallel-ssh -p 50 ... true`: one ssh process per host, fresh connections.
#   cm-parallel    the warm-connection floor: ControlMaster connections are opened to every
#                  host first (untimed); the timed part runs `ssh -S <socket> ... true` for all
#                  hosts in parallel (background jobs, then wait), reusing those connections.
#   cm-sequential  the same loop one host after another.
#   ansible        `ansible all -i hosts.ini -m raw -a true -f 50` on the inventory exported by
#                  `runbook inventory export --format ansible`, with Ansible's default SSH
#                  settings (ControlMaster=auto, ControlPersist=60s: from the second run on,
#                  its connections are warm, which favours it).
#   ansible-cold   the same with ANSIBLE_SSH_ARGS="-C -o ControlMaster=no": a fresh connection
#                  per host on every run, like runbook and parallel-ssh.
#
# Every tool is first run once untimed and checked: runbook must report N succeeded hosts,
# pssh N [SUCCESS] lines, ansible N CHANGED lines, the ControlMaster loop N exit codes of 0;
# and the sshd logs must show the N new logins each fresh-connection tool is expected to make.
#
# The issue's goal: runbook's wall time <= parallel-ssh's, and >= 10x faster than Ansible
# (judged against both Ansible rows).
#
# Usage: bench/ssh-fanout.sh            (RUNBOOK_BIN=/path/to/runbook to skip the build)
# Env:   SIZES ("10 50"), WARMUP (1), RUNS (10), ANSIBLE_RUNS (5), FORKS (50),
#        KEEP_TMP=1 to keep the generated files, EVIDENCE_PARENT=DIR for runbook's bundles,
#        ANSIBLE=/path/to/ansible, NO_INSTALL=1 to never install anything.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SIZES="${SIZES:-10 50}"
export WARMUP="${WARMUP:-1}" RUNS="${RUNS:-10}"
ANSIBLE_RUNS="${ANSIBLE_RUNS:-5}"
FORKS="${FORKS:-50}"
SSHD=/usr/sbin/sshd

ensure_tools hyperfine:hyperfine ssh:openssh-client ssh-keygen:openssh-client \
  parallel-ssh:pssh python3:python3
[[ -x "$SSHD" ]] || ensure_tools sshd:openssh-server
[[ -x "$SSHD" ]] || die "$SSHD is required (apt-get install openssh-server)"
PSSH="$(command -v parallel-ssh || command -v pssh || true)"
[[ -n "$PSSH" ]] || die "parallel-ssh is required (apt-get install pssh)"

# Ansible: on PATH, in ~/.local/bin, or installed there with pip.
find_ansible() {
  local a
  for a in "${ANSIBLE:-}" "$(command -v ansible || true)" "$HOME/.local/bin/ansible"; do
    [[ -n "$a" && -x "$a" ]] && { echo "$a"; return 0; }
  done
  return 1
}
if ! ANSIBLE="$(find_ansible)"; then
  if [[ "${NO_INSTALL:-0}" != 1 ]]; then
    log "installing ansible-core with pip (--user)"
    python3 -m pip install --user 'ansible-core>=2.15,<2.18' >&2 ||
      python3 -m pip install --user --break-system-packages 'ansible-core>=2.15,<2.18' >&2 || true
  fi
  ANSIBLE="$(find_ansible)" || die "ansible is required (python3 -m pip install --user 'ansible-core>=2.15,<2.18')"
fi
have_hyperfine || log "hyperfine not available: using a date +%s.%N loop"
resolve_runbook_bin

WORK="$(mktemp -d "${TMPDIR:-/tmp}/runbook-ssh-fanout.XXXXXX")"
SSHD_PIDS=()
MASTERS=()
cleanup() {
  local s p
  # Our ControlMaster connections, and Ansible's (ControlPersist would keep them for 60 s).
  for s in "${MASTERS[@]}" "$WORK"/ansible-cp/*; do
    [[ -S "$s" ]] && ssh -F "$WORK/ssh_config" -S "$s" -O exit 127.0.0.1 >/dev/null 2>&1 || true
  done
  # Each sshd's per-connection processes first (they outlive the listener), then the listener.
  for p in "${SSHD_PIDS[@]}"; do
    pkill -TERM -P "$p" 2>/dev/null || true
    kill "$p" 2>/dev/null || true
  done
  if [[ "${KEEP_TMP:-0}" == 1 ]]; then
    log "kept generated files in $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
EVID_PARENT="${EVIDENCE_PARENT:-$WORK}"
USER_NAME="$(id -un)"
MAX_N=0
for n in $SIZES; do ((n > MAX_N)) && MAX_N=$n; done

# One client key for every tool; ssh options every OpenSSH-based tool uses (runbook reads the
# same key and known_hosts from its inventory).
ssh-keygen -q -t ed25519 -N '' -C runbook-bench -f "$WORK/id_client"
cat >"$WORK/ssh_config" <<EOF
Host *
  User $USER_NAME
  IdentityFile $WORK/id_client
  IdentitiesOnly yes
  UserKnownHostsFile $WORK/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
EOF
: >"$WORK/known_hosts"

# sshd runs every command through the login user's shell (`$SHELL -c ...`). bash started by
# sshd sources ~/.bashrc even when non-interactive, unless it is not a top-level shell: with
# SHLVL=1 set by sshd it counts itself as level 2 and skips it. Without this, every tool pays
# for whatever that .bashrc does on every host (on the machine the README figures come from,
# `pyenv init`: ~90 ms of CPU per command), which is not what this benchmark measures.
# SOURCE_BASHRC=1 keeps the login shell's normal behaviour.
SETENV="SetEnv SHLVL=1"
[[ "${SOURCE_BASHRC:-0}" == 1 ]] && SETENV=""

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_sshd I: an sshd for host I on a free port of 127.0.0.1; sets PORTS[I].
PORTS=()
start_sshd() {
  local i="$1" d="$WORK/sshd/$1" port try pid
  mkdir -p "$d"
  ssh-keygen -q -t ed25519 -N '' -C "bench-host-$i" -f "$d/host_key"
  cp "$WORK/id_client.pub" "$d/authorized_keys"
  for try in 1 2 3 4 5; do
    port="$(free_port)"
    cat >"$d/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey $d/host_key
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers $USER_NAME
MaxStartups 200:30:400
LogLevel INFO
$SETENV
EOF
    "$SSHD" -D -f "$d/sshd_config" -E "$d/sshd.log" </dev/null >/dev/null 2>&1 &
    pid=$!
    local t
    for t in $(seq 200); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        SSHD_PIDS+=("$pid")
        PORTS[i]=$port
        echo "[127.0.0.1]:$port $(cut -d' ' -f1-2 "$d/host_key.pub")" >>"$WORK/known_hosts"
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.02
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    log "sshd $i did not start on port $port (try $try): $(tail -n 2 "$d/sshd.log" 2>/dev/null)"
  done
  die "could not start sshd $i"
}

# CPU time (ms) used so far by every sshd process: the listeners, their live descendants, and
# (through the parents' cutime/cstime) every descendant already reaped. The difference over a
# timed block is what the servers spent on it, whichever tool drove them.
sshd_cpu_ms() {
  python3 - "${SSHD_PIDS[@]}" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
parent, cpu = {}, {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    f = stat[stat.rindex(")") + 2:].split()
    parent[int(pid)] = int(f[1])
    cpu[int(pid)] = sum(int(x) for x in f[11:15])
roots = set(map(int, sys.argv[1:]))
def under(p):
    while p > 1:
        if p in roots:
            return True
        p = parent.get(p, 0)
    return False
print(round(sum(c for p, c in cpu.items() if under(p)) * 1000 / tick))
PY
}

logins() {
  cat "$WORK"/sshd/*/sshd.log 2>/dev/null | grep -c 'Accepted publickey' || true
}

# Expects exactly `want` new logins since `before` over all sshds.
check_logins() {
  local what="$1" before="$2" want="$3" now
  now="$(logins)"
  ((now - before == want)) || die "$what: expected $want new SSH logins, the sshd logs show $((now - before))"
}

log "$(machine_summary)"
log "starting $MAX_N sshd instances on 127.0.0.1"
for ((i = 0; i < MAX_N; i++)); do start_sshd "$i"; done

# Per size: inventory, runbook, pssh host list, ansible inventory, ControlMaster scripts.
generate() {
  local n="$1" d="$WORK/n$1" i
  mkdir -p "$d"
  : >"$d/inventory.toml"
  : >"$d/pssh-hosts"
  for ((i = 0; i < n; i++)); do
    printf '[hosts.h%03d]\naddress = "127.0.0.1"\nport = %d\nuser = "%s"\nidentity_file = "%s"\nknown_hosts = "%s"\nuse_agent = false\n\n' \
      "$i" "${PORTS[i]}" "$USER_NAME" "$WORK/id_client" "$WORK/known_hosts" >>"$d/inventory.toml"
    echo "127.0.0.1:${PORTS[i]}" >>"$d/pssh-hosts"
  done
  cat >"$d/runbook.toml" <<EOF
[runbook]
name = "fanout-$n"
inventory = "inventory.toml"

[[steps]]
id = "true"
on = "all"
strategy = { parallel = $FORKS }
run = "true"
EOF
  "$RUNBOOK_BIN" inventory export "$d/inventory.toml" --format ansible >"$d/hosts.ini"
  # The warm-connection floor: one master per host (opened by cm_open), then `true` through it.
  {
    echo '#!/usr/bin/env bash'
    echo 'pids=(); fail=0'
    for ((i = 0; i < n; i++)); do
      echo "ssh -F '$WORK/ssh_config' -S '$WORK/cm/${PORTS[i]}' -p ${PORTS[i]} 127.0.0.1 true & pids+=(\$!)"
    done
    echo 'for p in "${pids[@]}"; do wait "$p" || fail=1; done'
    echo 'exit $fail'
  } >"$d/cm-parallel.sh"
  {
    echo '#!/usr/bin/env bash'
    echo 'set -e'
    for ((i = 0; i < n; i++)); do
      echo "ssh -F '$WORK/ssh_config' -S '$WORK/cm/${PORTS[i]}' -p ${PORTS[i]} 127.0.0.1 true"
    done
  } >"$d/cm-sequential.sh"
  chmod +x "$d/cm-parallel.sh" "$d/cm-sequential.sh"
}

# ControlMaster connections to the first N hosts (not timed).
cm_open() {
  local n="$1" i s
  mkdir -p "$WORK/cm"
  for ((i = 0; i < n; i++)); do
    s="$WORK/cm/${PORTS[i]}"
    [[ -S "$s" ]] && continue
    ssh -F "$WORK/ssh_config" -M -S "$s" -o ControlPersist=yes -fN -p "${PORTS[i]}" 127.0.0.1 ||
      die "could not open a ControlMaster connection to port ${PORTS[i]}"
    MASTERS+=("$s")
  done
}

export ANSIBLE_NOCOLOR=1 ANSIBLE_HOST_KEY_CHECKING=True ANSIBLE_SSH_CONTROL_PATH_DIR="$WORK/ansible-cp" \
  ANSIBLE_LOCAL_TEMP="$WORK/ansible-tmp" ANSIBLE_PYTHON_INTERPRETER=auto_silent

ANSIBLE_COLD="ANSIBLE_SSH_ARGS=-C -o ControlMaster=no"

rb_args() { echo run "$WORK/n$1/runbook.toml" --forks "$FORKS" --no-progress --evidence-dir "$EVID_PARENT/evidence-$1"; }
pssh_args() { echo -h "$WORK/n$1/pssh-hosts" -p "$FORKS" -t 0 -x "-F $WORK/ssh_config" true; }
ansible_args() { echo all -i "$WORK/n$1/hosts.ini" -m raw -a true -f "$FORKS"; }

verify() {
  local n="$1" d="$WORK/n$1" before got
  before="$(logins)"
  got="$("$RUNBOOK_BIN" run "$d/runbook.toml" --forks "$FORKS" --no-progress --evidence-dir "$d/verify-evidence" 2>&1 || true)"
  local m
  m="$(find "$d/verify-evidence" -name manifest.json | head -n1)"
  [[ -n "$m" ]] || die "runbook n=$n wrote no manifest: $got"
  got="$(python3 -c 'import json, sys
m = json.load(open(sys.argv[1]))
s = [s for s in m["steps"] if s["id"] == "true"][0]
print(sum(1 for t in s["targets"] if t["status"] == "succeeded"))' "$m")"
  [[ "$got" == "$n" ]] || die "runbook n=$n: $got of $n hosts succeeded"
  rm -rf "$d/verify-evidence"
  check_logins "runbook n=$n" "$before" "$n"

  before="$(logins)"
  # Word splitting of pssh_args is intended; the -x value has no spaces but the one after -F.
  got="$("$PSSH" -h "$d/pssh-hosts" -p "$FORKS" -t 0 -x "-F $WORK/ssh_config" true | grep -c '\[SUCCESS\]' || true)"
  [[ "$got" == "$n" ]] || die "parallel-ssh n=$n: $got of $n [SUCCESS]"
  check_logins "parallel-ssh n=$n" "$before" "$n"

  cm_open "$n"
  "$d/cm-parallel.sh" || die "ControlMaster loop (parallel) n=$n failed"
  "$d/cm-sequential.sh" || die "ControlMaster loop (sequential) n=$n failed"

  got="$("$ANSIBLE" all -i "$d/hosts.ini" -m raw -a true -f "$FORKS" 2>&1 | grep -c '| CHANGED | rc=0' || true)"
  [[ "$got" == "$n" ]] || die "ansible n=$n: $got of $n CHANGED; run: $ANSIBLE $(ansible_args "$n")"
  before="$(logins)"
  got="$(env "$ANSIBLE_COLD" "$ANSIBLE" all -i "$d/hosts.ini" -m raw -a true -f "$FORKS" 2>&1 | grep -c '| CHANGED | rc=0' || true)"
  [[ "$got" == "$n" ]] || die "ansible (cold) n=$n: $got of $n CHANGED"
  check_logins "ansible (cold) n=$n" "$before" "$n"
  log "n=$n: verified runbook, parallel-ssh, the ControlMaster loops and ansible on all $n hosts"
}

declare -A results server
# timed N TOOL PREPARE COMMAND...: measure, and the servers' CPU per host and run meanwhile.
timed() {
  local n="$1" tool="$2" prepare="$3" before after runs="$RUNS"
  shift 3
  [[ "$tool" == ansible* ]] && runs="$ANSIBLE_RUNS"
  before="$(sshd_cpu_ms)"
  results[$n.$tool]="$(RUNS=$runs measure "$tool-$n" "$prepare" "$@")"
  sleep 0.3 # let the listeners reap the last connections
  after="$(sshd_cpu_ms)"
  server[$n.$tool]="$(awk -v d="$((after - before))" -v r="$((WARMUP + runs))" -v n="$n" 'BEGIN { printf "%.1f", d / r / n }')"
}

bench_size() {
  local n="$1" d="$WORK/n$1" rb an
  read -r -a rb <<<"$(rb_args "$n")"
  read -r -a an <<<"$(ansible_args "$n")"
  log "timing n=$n: warmup $WARMUP, runs $RUNS (ansible: $ANSIBLE_RUNS)"
  timed "$n" runbook "rm -rf $(printf '%q' "$EVID_PARENT/evidence-$n")" "$RUNBOOK_BIN" "${rb[@]}"
  timed "$n" pssh "" "$PSSH" -h "$d/pssh-hosts" -p "$FORKS" -t 0 -x "-F $WORK/ssh_config" true
  timed "$n" cm-parallel "" "$d/cm-parallel.sh"
  timed "$n" cm-sequential "" "$d/cm-sequential.sh"
  timed "$n" ansible "" "$ANSIBLE" "${an[@]}"
  timed "$n" ansible-cold "" env "$ANSIBLE_COLD" "$ANSIBLE" "${an[@]}"
  rm -rf "$EVID_PARENT/evidence-$n"
}

# sed -n 1p reads everything: `| head -n1` makes ansible die of a broken pipe.
ANSIBLE_VERSION="$("$ANSIBLE" --version 2>/dev/null | sed -n 1p)"
PSSH_VERSION="$("$PSSH" --version 2>&1 | sed -n 1p)"
BUSY_BEFORE="$(warn_if_busy)"
log "runbook: $RUNBOOK_BIN ($("$RUNBOOK_BIN" --version))"
log "parallel-ssh $PSSH_VERSION, $(ssh -V 2>&1), $ANSIBLE_VERSION"
log "$(hyperfine --version 2>/dev/null || echo 'no hyperfine'), work dir: $WORK, evidence under: $EVID_PARENT"

for n in $SIZES; do
  generate "$n"
  verify "$n"
  bench_size "$n"
done

mean() { awk '{ print $1 }' <<<"${results[$1]}"; }

echo
machine_summary
echo "$(ssh -V 2>&1), $ANSIBLE_VERSION, parallel-ssh $PSSH_VERSION"
echo "runbook --forks $FORKS (parallel $FORKS, evidence on $(df -T "$EVID_PARENT" | awk 'NR == 2 { print $2 }')), parallel-ssh -p $FORKS, ansible -f $FORKS;"
echo "mean ± sd of $RUNS runs ($ANSIBLE_RUNS for ansible) after $WARMUP warm-up; sshds and clients share the same $(nproc) cores"
echo "CPU busy with other work, 1 s sample: before ${BUSY_BEFORE}%, after $(cpu_busy_pct)% (should be ~0)"
echo
printf '%-14s' tool
for n in $SIZES; do printf ' | %20s' "n=$n ms"; done
echo
for tool in runbook pssh cm-parallel cm-sequential ansible ansible-cold; do
  printf '%-14s' "$tool"
  for n in $SIZES; do
    read -r m s _ _ <<<"${results[$n.$tool]}"
    printf ' | %11.1f ± %6.1f' "$m" "$s"
  done
  echo
done
echo
echo "CPU per run: the servers' (all sshd processes, per host) and the client's (the timed command and"
echo "the children it waited for; Ansible's ControlPersist masters are detached and not counted)"
printf '%-14s' tool
for n in $SIZES; do printf ' | %9s %9s' "sshd/host" "client"; done
echo
for tool in runbook pssh cm-parallel cm-sequential ansible ansible-cold; do
  printf '%-14s' "$tool"
  for n in $SIZES; do
    read -r _ _ _ _ u sy <<<"${results[$n.$tool]}"
    printf ' | %6s ms %9s' "${server[$n.$tool]}" "$(awk -v u="$u" -v s="$sy" 'BEGIN { if (u == "-") print "-"; else printf "%.1f ms", u + s }')"
  done
  echo
done
echo
verdict=met
for n in $SIZES; do
  line="$(awk -v r="$(mean "$n.runbook")" -v p="$(mean "$n.pssh")" -v a="$(mean "$n.ansible")" \
    -v ac="$(mean "$n.ansible-cold")" -v c="$(mean "$n.cm-parallel")" 'BEGIN {
      printf "runbook/pssh %.2fx (goal <= 1: %s) | ansible/runbook %.1fx (goal >= 10: %s) | ansible-cold/runbook %.1fx (%s) | runbook/cm-parallel %.2fx",
        r / p, (r <= p) ? "met" : "NOT met", a / r, (a / r >= 10) ? "met" : "NOT met",
        ac / r, (ac / r >= 10) ? "met" : "NOT met", r / c }')"
  printf 'n=%-3s %s\n' "$n" "$line"
  [[ "$line" == *"NOT met"* ]] && verdict="NOT met"
  # What the servers alone need when every host gets a fresh connection: their CPU per
  # connection (as measured while runbook ran) times the hosts, spread over every core.
  awk -v n="$n" -v s="${server[$n.runbook]}" -v cores="$(nproc)" -v a="$(mean "$n.ansible")" \
    -v ac="$(mean "$n.ansible-cold")" 'BEGIN {
      f = n * s / cores
      printf "      servers alone: %d fresh connections x %.1f ms of sshd CPU / %d cores = %.0f ms at best;", n, s, cores, f
      printf " 10x ansible needs <= %.0f ms, 10x ansible-cold <= %.0f ms\n", a / 10, ac / 10 }'
done
echo
echo "goal (runbook <= parallel-ssh and >= 10x faster than ansible, every size): $verdict"
