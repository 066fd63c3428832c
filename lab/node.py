#!/usr/bin/python3
"""The Rocky 9 tools of a lab node, one program called by many names (symlinks in the node's
/usr/local/bin, which is ahead of /usr/bin on sshd's and sudo's PATH): `rke2`, the install
script (`curl https://get.rke2.io` answers it), `systemctl`, `dnf`, `rpm`, `firewall-cmd`,
`getenforce`, `nmcli`, `hostnamectl`, `systemd-detect-virt`, `timedatectl`, `lsblk`, `ss`,
`needs-restarting`, `systemd-run`, `reboot`, `shutdown`, `rke2-killall.sh`. `kubectl` and `helm` are in kubectl.py.

`rke2 etcd-snapshot` and `rke2 server --cluster-reset` also speak to S3 when `etcd-s3` is set
(config.yaml or flags): the lab's S3 is lab/s3.py, the client the real `curl --aws-sigv4`.

State is kept in /var/lib/lab-node (the node's own /var/lib overlay).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from labcommon import (  # noqa: E402
    NODE_STATE, RKE2_DATA, RKE2_RENEW_DAYS, Etcd, LabError, Store, age_certs, cert_not_after, node_certs, node_info,
    parse_version, rfc3339,
)

HERE = os.path.dirname(os.path.realpath(__file__))
DATA = "/var/lib/rancher/rke2"
DB = DATA + "/server/db"
SNAPDIR = DB + "/snapshots"


def state_path(name):
    os.makedirs(NODE_STATE, exist_ok=True)
    return os.path.join(NODE_STATE, name)


def load(name, default):
    try:
        with open(state_path(name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def save(name, data):
    tmp = state_path(name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, state_path(name))


def need_root():
    if os.geteuid() != 0:
        raise LabError("This command has to be run with superuser privileges (under the root user on most systems).")


def lab_info():
    info = node_info()
    if not info:
        raise LabError("not inside a lab node")
    return info


# ------------------------------------------------------------------------------- systemctl

DAEMONS = ("rke2-server", "rke2-agent")
DEFAULT_UNITS = {
    "firewalld": {"enabled": True, "active": True},
    "NetworkManager": {"enabled": True, "active": True},
    "chronyd": {"enabled": True, "active": True},
    "sshd": {"enabled": True, "active": True},
}


def unit_name(u):
    return re.sub(r"\.service$", "", u)


def units():
    u = load("units.json", None)
    if u is None:
        u = dict(DEFAULT_UNITS)
        save("units.json", u)
    return u


def unit_known(u):
    if u in DAEMONS:
        inst = load("installed.json", None)
        return bool(inst) and f"rke2-{inst['type']}" == u
    if u == "iscsid":
        return "iscsi-initiator-utils" in load("packages.json", [])
    return u in units()


def daemon_pid(u):
    try:
        with open(state_path(u + ".pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return None
        return pid
    except (OSError, ValueError):
        return None


def daemon_start(u, block=True):
    """Start a unit's daemon; like systemd with a Type=notify unit, wait until it says it is up,
    unless `--no-block` (a boot: systemd starts the enabled units without anyone waiting)."""
    if daemon_pid(u):
        return 0
    for stale in (".ready", ".failed"):
        try:
            os.remove(state_path(u + stale))
        except OSError:
            pass
    logf = open(state_path(u + ".log"), "ab")
    # systemd starts units with its own clean environment, never the caller's (nor its
    # RUNBOOK_EXEC_ID, by which runbook finds and stops what a command started).
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    p = subprocess.Popen(["/usr/bin/python3", os.path.join(HERE, "service.py"), u.split("-")[1]],
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                         cwd="/", env=env)
    with open(state_path(u + ".pid"), "w") as f:
        f.write(str(p.pid))
    if not block:
        return 0
    end = time.time() + 180
    while time.time() < end:
        if os.path.exists(state_path(u + ".ready")):
            return 0
        if p.poll() is not None or os.path.exists(state_path(u + ".failed")):
            tail = [ln for ln in open(state_path(u + ".log"), errors="replace").read().splitlines()
                    if "scheduled restart" not in ln][-3:]
            sys.stderr.write(f"Job for {u}.service failed because the control process exited with error code.\n"
                             f"See \"systemctl status {u}.service\" and \"journalctl -xeu {u}.service\" for details.\n")
            for line in tail:
                sys.stderr.write(f"{u}[{p.pid}]: {line}\n")
            return 1
        time.sleep(0.2)
    sys.stderr.write(f"Job for {u}.service failed because a timeout was exceeded.\n")
    return 1


def daemon_stop(u):
    pid = daemon_pid(u)
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        pass
    for _ in range(50):
        if not daemon_pid(u):
            break
        time.sleep(0.1)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    for stale in (".ready", ".failed"):
        try:
            os.remove(state_path(u + stale))
        except OSError:
            pass


def systemctl(args):
    flags = [a for a in args if a.startswith("-")]
    args = [a for a in args if not a.startswith("-")]
    if not args:
        print("UNIT FILES ...")
        return 0
    verb, names = args[0], [unit_name(a) for a in args[1:]]
    now = "--now" in flags
    quiet = "--quiet" in flags or "-q" in flags
    if verb in ("daemon-reload", "reset-failed"):
        return 0
    if verb in ("reboot", "poweroff", "halt"):
        need_root()
        if verb != "reboot":
            raise LabError(f"lab: systemctl {verb} is not modelled (a lab node only reboots)")
        return schedule_reboot(0.5)
    if verb in ("is-active", "is-enabled", "is-failed"):
        rc = 0
        for u in names:
            if verb == "is-active":
                if u in DAEMONS:
                    if not (unit_known(u) and daemon_pid(u)):
                        s = "inactive"
                    elif os.path.exists(state_path(u + ".failed")):
                        s = "activating"  # waiting for its automatic restart
                    else:
                        s = "active"
                else:
                    s = "active" if unit_known(u) and units().get(u, {}).get("active") else "inactive"
                ok = s == "active"
            elif verb == "is-enabled":
                if not unit_known(u):
                    if not quiet:
                        sys.stderr.write(f"Failed to get unit file state for {u}.service: No such file or directory\n")
                    rc = 1
                    continue
                s = "enabled" if units().get(u, {}).get("enabled") else "disabled"
                ok = s == "enabled"
            else:
                s, ok = "inactive", False
            if not quiet:
                print(s)
            if not ok:
                rc = 3 if verb == "is-active" else 1
        return rc
    need_root()
    rc = 0
    for u in names:
        if not unit_known(u):
            sys.stderr.write(f"Failed to {verb} {u}.service: Unit {u}.service not found.\n")
            rc = 5
            continue
        st = units()
        cur = st.setdefault(u, {"enabled": False, "active": False})
        if verb in ("enable", "disable"):
            cur["enabled"] = verb == "enable"
            save("units.json", st)
            if now:
                rc |= systemctl([("start" if verb == "enable" else "stop"), u])
            continue
        if verb in ("start", "stop", "restart", "reload", "try-restart", "reload-or-restart"):
            if u in DAEMONS:
                if verb in ("stop", "restart", "try-restart", "reload-or-restart"):
                    daemon_stop(u)
                if verb != "stop":
                    rc |= daemon_start(u, block="--no-block" not in flags)
            else:
                if verb != "reload":
                    cur["active"] = verb != "stop"
                save("units.json", st)
            continue
        if verb == "status":
            active = daemon_pid(u) if u in DAEMONS else cur.get("active")
            print(f"● {u}.service\n   Active: {'active (running)' if active else 'inactive (dead)'}")
            rc = 0 if active else 3
            continue
        sys.stderr.write(f"Unknown command verb {verb}.\n")
        return 1
    return rc


# ------------------------------------------------------------------------------- reboot


def schedule_reboot(delay):
    """The reboot is done by the lab from outside the node (every process of the node goes,
    this one too): `scripts/lab reboot-node` in the namespaces of the lab's Proxmox daemon."""
    info = lab_info()
    with open(os.path.join(info["lab_dir"], "lab.json")) as f:
        host_pid = json.load(f)["pve_pid"]
    subprocess.Popen(["nsenter", "-t", str(host_pid), "-m", "-u", "--", "/usr/bin/python3",
                      os.path.join(HERE, "lab.py"), "reboot-node", "--dir", info["lab_dir"], info["name"],
                      "--delay", str(delay)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return 0


def systemd_run(args):
    """`systemd-run --on-active=N … CMD`: only a delayed reboot is modelled."""
    need_root()
    delay = 0.0
    i = 0
    while i < len(args) and args[i].startswith("-"):
        a = args[i]
        if a.startswith("--on-active="):
            delay = float(re.sub(r"s$", "", a.split("=", 1)[1]))
        elif a in ("--on-active", "--unit", "--description", "-p", "--property"):
            if a == "--on-active":
                delay = float(re.sub(r"s$", "", args[i + 1]))
            i += 1
        i += 1
    cmd = args[i:]
    if cmd and os.path.basename(cmd[0]) in ("systemctl", "reboot", "shutdown") and (
            os.path.basename(cmd[0]) != "systemctl" or cmd[1:2] == ["reboot"]):
        print("Running timer as unit: run-lab-reboot.timer\nWill run service as unit: run-lab-reboot.service")
        return schedule_reboot(max(delay, 0.5))
    raise LabError(f"lab systemd-run: only a (delayed) reboot is modelled, not {' '.join(cmd)}")


def needs_restarting(args):
    """`needs-restarting -r`: 1 when a core package was installed after this boot."""
    if "-r" not in args and "--reboothint" not in args:
        return 0
    try:
        with open(state_path("booted-at")) as f:
            booted = float(f.read().strip())
    except (OSError, ValueError):
        booted = 0.0
    core = [n for n, p in os_packages().items() if n in CORE_PACKAGES and p["installed"] > booted]
    if core:
        print("Core libraries or services have been updated since boot-up:")
        for n in sorted(core):
            print(f"  * {n}")
        print("\nReboot is required to fully utilize these updates.\n"
              "More information: https://access.redhat.com/solutions/27943")
        return 1
    print("No core libraries or services have been updated since boot-up.\nReboot should not be necessary.")
    return 0


# ------------------------------------------------------------------------------- install


def install(env):
    need_root()
    info = lab_info()
    if os.path.exists(state_path("fail-install")):
        raise LabError("curl: (22) The requested URL returned error: 503 (lab fault fail-install)")
    typ = env.get("INSTALL_RKE2_TYPE", "server")
    version = env.get("INSTALL_RKE2_VERSION") or info.get("stable_version", "v1.33.4+rke2r1")
    method = env.get("INSTALL_RKE2_METHOD", "rpm")
    if typ not in ("server", "agent"):
        raise LabError(f"[ERROR]  invalid INSTALL_RKE2_TYPE {typ}")
    want = parse_version(version)
    if version not in info.get("available_versions", [version]):
        raise LabError(f"[ERROR]  rke2 version {version} not found in channel (lab offers {', '.join(info['available_versions'])})")
    cur = load("installed.json", None)
    if cur:
        have = parse_version(cur["version"])
        if want[1] > have[1] + 1:
            raise LabError(f"[ERROR]  cannot upgrade from {cur['version']} to {version}: minor versions must be upgraded one at a time")
        if method == "rpm" and "rke2-*" in load("versionlock.json", []) and want != have:
            raise LabError("Error: Package rke2-%s is excluded by versionlock (dnf versionlock delete rke2-*)" % typ)
    print(f"[INFO]  using {version} as release")
    print(f"[INFO]  installing rke2-{typ} via {method} (lab)")
    save("installed.json", {"type": typ, "version": version, "method": method, "installed_at": time.time()})
    pk = load("packages.json", [])
    for p in (f"rke2-{typ}", "rke2-common", "rke2-selinux", "container-selinux"):
        if p not in pk:
            pk.append(p)
    save("packages.json", pk)
    repos = load("repos.json", {})
    minor = f"{want[0]}.{want[1]}"
    repos[f"rancher-rke2-1-{want[1]}-latest"] = {"enabled": True, "minor": minor}
    repos["rancher-rke2-common-latest"] = {"enabled": True}
    save("repos.json", repos)
    os.makedirs(DATA + "/bin", exist_ok=True)
    for tool in ("kubectl", "crictl", "ctr"):
        dst = os.path.join(DATA, "bin", tool)
        if not os.path.lexists(dst):
            os.symlink(os.path.join(HERE, "kubectl.py") if tool == "kubectl" else "/bin/true", dst)
    st = units()
    st.setdefault(f"rke2-{typ}", {"enabled": False, "active": False})
    save("units.json", st)
    return 0


INSTALL_SCRIPT = """#!/bin/sh
# get.rke2.io as answered by the lab: installs through the lab's rke2-install
set -e
exec /usr/local/bin/rke2-install "$@"
"""


def curl(args):
    urls = [a for a in args if re.match(r"^https?://", a)]
    if urls and re.match(r"^https?://get\.rke2\.io/?$", urls[0]):
        if os.path.exists(state_path("fail-install")):
            sys.stderr.write("curl: (22) The requested URL returned error: 503\n")
            return 22
        out = None
        for i, a in enumerate(args):
            if a in ("-o", "--output") and i + 1 < len(args):
                out = args[i + 1]
        if out:
            with open(out, "w") as f:
                f.write(INSTALL_SCRIPT)
        else:
            sys.stdout.write(INSTALL_SCRIPT)
        return 0
    os.execv("/usr/bin/curl", ["curl"] + args)


# ------------------------------------------------------------------------------- rke2


def local_etcd():
    return Etcd(f"http://{lab_info()['ip']}:2379", timeout=5)


def rke2(args):
    inst = load("installed.json", None)
    if not inst:
        raise LabError("rke2: command not found", 127)
    if args[:1] in (["--version"], ["-v"]):
        print(f"rke2 version {inst['version']} (lab)\ngo version go1.24.6 X:boringcrypto")
        return 0
    if args[:1] == ["etcd-snapshot"]:
        return etcd_snapshot(args[1:])
    if args[:1] == ["server"]:
        return rke2_server(args[1:])
    if args[:1] == ["certificate"]:
        return rke2_certificate(args[1:])
    raise LabError(f"rke2 (lab): unsupported command {' '.join(args)}")


def opt(args, name, default=None):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


# ------------------------------------------------------------------------------- etcd-s3

S3_OPTS = ("endpoint", "bucket", "folder", "access-key", "secret-key", "region", "insecure",
           "skip-ssl-verify", "endpoint-ca")
S3_BOOLS = ("insecure", "skip-ssl-verify")


def truthy(v):
    return str(v).strip().lower() in ("true", "1", "yes", "on")


def bool_flag(args, names, default):
    for a in args:
        for n in names:
            if a == n:
                default = True
            elif a.startswith(n + "="):
                default = a.split("=", 1)[1]
    return default


def s3_settings(args):
    """RKE2's etcd-s3 settings: config.yaml's `etcd-s3*` keys, over which the command's flags win
    (`--s3-*` on `etcd-snapshot`, `--etcd-s3-*` on `server`). None when S3 is off."""
    sys.path.insert(0, HERE)
    from service import read_config  # noqa: E402

    cfg = read_config()
    if not truthy(bool_flag(args, ("--s3", "--etcd-s3"), cfg.get("etcd-s3", False))):
        return None
    s = {}
    for k in S3_OPTS:
        names = ("--s3-" + k, "--etcd-s3-" + k)
        v = cfg.get("etcd-s3-" + k)
        if k in S3_BOOLS:
            v = truthy(bool_flag(args, names, v or False))
        else:
            for n in names:
                v = opt(args, n, v)
        s[k] = v
    s["endpoint"] = s["endpoint"] or "s3.amazonaws.com"
    s["region"] = s["region"] or "us-east-1"
    s["folder"] = (s["folder"] or "").strip("/")
    if not s["bucket"]:
        raise LabError("level=fatal msg=\"s3 bucket name was not set\"")
    return s


def s3_key(s, name):
    return f"{s['folder']}/{name}" if s["folder"] else name


def s3_location(s, name):
    return f"s3://{s['bucket']}/{s3_key(s, name)}"


def s3_request(s, method, key="", query="", infile=None, outfile=None):
    """One SigV4-signed S3 request with the real curl (`--aws-sigv4`); returns the body (or writes
    it to outfile). The keys go to curl on stdin, never on its command line (`ps`)."""
    import hashlib
    import tempfile

    scheme = "http" if s["insecure"] else "https"
    url = f"{scheme}://{s['endpoint']}/{s['bucket']}" + (f"/{key}" if key else "") + (f"?{query}" if query else "")
    h = hashlib.sha256()
    if infile:
        with open(infile, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    body = tempfile.NamedTemporaryFile(delete=False)
    body.close()
    cmd = ["/usr/bin/curl", "-sS", "--connect-timeout", "10", "-K", "-", "-X", method, "-o", outfile or body.name, "-w", "%{http_code}",
           "--aws-sigv4", f"aws:amz:{s['region']}:s3", "-H", f"x-amz-content-sha256: {h.hexdigest()}"]
    if infile:
        cmd += ["-T", infile]
    if scheme == "https":
        if s["skip-ssl-verify"]:
            cmd += ["-k"]
        else:
            # The CA that signed the S3 endpoint: etcd-s3-endpoint-ca, else the system trust store,
            # which on the lab's "image" is the lab CA (as a site CA would be on real VMs).
            cmd += ["--cacert", s["endpoint-ca"] or os.path.join(lab_info()["lab_dir"], "tls", "ca.pem")]
    cmd += [url]
    cred = f'user = "{s["access-key"] or ""}:{s["secret-key"] or ""}"\n'
    try:
        r = subprocess.run(cmd, input=cred, capture_output=True, text=True, timeout=60)
        with open(body.name, errors="replace") as f:
            text = f.read()
    finally:
        os.unlink(body.name)
    if r.returncode != 0:
        raise LabError(f"level=fatal msg=\"s3 {method} {url}: {r.stderr.strip()}\"")
    code = r.stdout.strip()
    if not code.startswith("2"):
        m = re.search(r"<Code>(.*?)</Code>", text)
        raise LabError(f"level=fatal msg=\"s3 {method} {url}: HTTP {code} {m.group(1) if m else text[:200]}\"")
    return text


def s3_list(s):
    """The snapshots under the folder: [(name, size, last_modified)]."""
    import xml.etree.ElementTree as ET

    prefix = s["folder"] + "/" if s["folder"] else ""
    out = []
    token = None
    while True:
        q = "list-type=2&prefix=" + prefix + (f"&continuation-token={token}" if token else "")
        root = ET.fromstring(s3_request(s, "GET", query=q))
        ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
        for c in root.findall(f"{ns}Contents"):
            name = c.find(f"{ns}Key").text[len(prefix):]
            if "/" in name:  # RKE2's .metadata/ and other folders
                continue
            modified = c.find(f"{ns}LastModified").text
            out.append((name, int(c.find(f"{ns}Size").text), modified.split(".")[0].rstrip("Z") + "Z"))
        nxt = root.find(f"{ns}NextContinuationToken")
        if nxt is None or not nxt.text:
            return out
        token = nxt.text


def snapshot_object(name, node, location, size, created, s3=None):
    """The EtcdSnapshotFile RKE2 keeps for a snapshot (local-… on its node, s3-… for S3)."""
    kind = "s3" if s3 else "local"
    spec = {"snapshotName": name, "nodeName": "s3" if s3 else node, "location": location}
    if s3:
        spec["s3"] = {"endpoint": s3["endpoint"], "bucket": s3["bucket"], "prefix": s3["folder"],
                      "region": s3["region"], "insecure": s3["insecure"], "skipSSLVerify": s3["skip-ssl-verify"]}
    return {"metadata": {"name": f"{kind}-{name}".lower().replace("_", "-")}, "spec": spec,
            "status": {"size": str(size), "readyToUse": True, "creationTime": created}}


def etcd_snapshot(args):
    need_root()
    info = lab_info()
    sub = [a for a in args if not a.startswith("-")]
    verb = sub[0] if sub else "save"
    os.makedirs(SNAPDIR, exist_ok=True)
    s3 = s3_settings(args)
    if verb in ("ls", "list"):
        print(f"{'Name':<60} {'Location':<100} {'Size':<10} Created")
        for f in sorted(os.listdir(SNAPDIR)):
            p = os.path.join(SNAPDIR, f)
            print(f"{f:<60} file://{p:<93} {os.path.getsize(p):<10} {rfc3339(os.path.getmtime(p))}")
        if s3:
            # An unreachable S3 is reported; the local snapshots are still listed.
            try:
                for name, size, modified in sorted(s3_list(s3)):
                    print(f"{name:<60} {s3_location(s3, name):<100} {size:<10} {modified}")
            except LabError as e:
                print(f"level=error msg=\"Error retrieving S3 snapshots: {e}\"", file=sys.stderr)
        return 0
    if verb == "save":
        if os.path.exists(state_path("disk-full")):
            raise LabError(f"level=fatal msg=\"failed to save snapshot: write {SNAPDIR}: no space left on device\"")
        name = opt(args, "--name", "on-demand")
        fname = f"{name}-{info['name']}-{int(time.time())}"
        path = os.path.join(SNAPDIR, fname)
        r = subprocess.run(["etcdctl", "--endpoints", f"http://{info['ip']}:2379", "--command-timeout=10s",
                            "snapshot", "save", path], capture_output=True, text=True,
                           env=dict(os.environ, ETCDCTL_API="3"))
        if r.returncode != 0:
            raise LabError(f"level=fatal msg=\"failed to save snapshot: {r.stderr.strip()}\"")
        created = rfc3339(time.time())
        objs = [snapshot_object(fname, info["name"], f"file://{path}", os.path.getsize(path), created)]
        print(f"level=info msg=\"Snapshot {fname} saved.\"")
        if s3:
            # RKE2 saves locally first, then uploads the file under the folder by the same name. A
            # failed upload does not fail the save: it is logged and its EtcdSnapshotFile says so.
            obj = snapshot_object(fname, info["name"], s3_location(s3, fname), os.path.getsize(path), created, s3)
            try:
                s3_request(s3, "PUT", s3_key(s3, fname), infile=path)
                print(f"level=info msg=\"Uploaded snapshot {fname} to {s3_location(s3, fname)}\"")
            except LabError as e:
                print(f"level=error msg=\"Error received during snapshot upload to S3: {e}\"", file=sys.stderr)
                obj["status"]["readyToUse"] = False
                obj["status"]["error"] = {"message": str(e), "time": created}
            objs.append(obj)
        try:
            store = Store(local_etcd())
            for o in objs:
                store.put("etcdsnapshotfiles", o)
        except LabError:
            pass
        return 0
    if verb in ("delete", "prune"):
        for n in sub[1:]:
            p = os.path.join(SNAPDIR, n)
            if os.path.exists(p):
                os.remove(p)
            if s3 and verb == "delete":
                s3_request(s3, "DELETE", s3_key(s3, n))
        return 0
    raise LabError(f"rke2 etcd-snapshot: unknown command {verb}")


def rke2_server(args):
    need_root()
    info = lab_info()
    if "--cluster-reset" not in args:
        raise LabError("rke2 server in the foreground is not supported by the lab; use systemctl")
    sys.path.insert(0, HERE)
    from service import read_config  # noqa: E402

    cfg = read_config()
    if cfg.get("server"):
        raise LabError("level=fatal msg=\"cannot perform cluster-reset while server URL is set - remove server from configuration before resetting\"")
    if os.path.exists(DB + "/reset-flag"):
        raise LabError("level=fatal msg=\"cluster-reset was successfully performed, please remove the cluster-reset flag and start rke2 normally, if you need to perform another cluster reset, you must first manually delete the /var/lib/rancher/rke2/server/db/reset-flag file\"")
    if subprocess.run(["pgrep", "-f", f"--listen-client-urls http://{info['ip']}:2379"],
                      capture_output=True).returncode == 0:
        raise LabError("level=fatal msg=\"etcd is running: stop rke2-server before a cluster-reset\"")
    path = opt(args, "--cluster-reset-restore-path")
    token = opt(args, "--token") or cfg.get("token")
    if opt(args, "--token-file"):
        with open(opt(args, "--token-file")) as f:
            token = f.read().strip()
    name, ip = info["name"], info["ip"]
    etcd_dir = DB + "/etcd"
    if not path:
        return reset_membership(name, ip, etcd_dir, token)
    s3 = s3_settings(args)
    if s3 and not os.path.isabs(path):
        # With etcd-s3 configured the restore path is an S3 snapshot name: RKE2 downloads it into
        # the snapshot directory first (--etcd-s3=false: a local file).
        os.makedirs(SNAPDIR, exist_ok=True)
        dest = os.path.join(SNAPDIR, os.path.basename(path))
        try:
            s3_request(s3, "GET", s3_key(s3, path), outfile=dest + ".part")
        except LabError:
            if os.path.exists(dest + ".part"):
                os.remove(dest + ".part")
            raise
        os.replace(dest + ".part", dest)
        print(f"level=info msg=\"Downloaded {s3_location(s3, path)} to {dest}\"")
        path = dest
    if not os.path.isabs(path):
        cand = os.path.join(SNAPDIR, path)
        if not os.path.exists(cand):
            raise LabError(f"level=fatal msg=\"etcd: snapshot path does not exist: {path}\"")
        path = cand
    if not os.path.exists(path):
        raise LabError(f"level=fatal msg=\"etcd: snapshot path does not exist: {path}\"")
    tmp = DB + "/etcd-restore-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run(["etcdctl", "snapshot", "restore", path, "--name", name, "--data-dir", tmp,
                        "--initial-cluster", f"{name}=http://{ip}:2380",
                        "--initial-advertise-peer-urls", f"http://{ip}:2380",
                        "--initial-cluster-token", "rke2-lab"], capture_output=True, text=True,
                       env=dict(os.environ, ETCDCTL_API="3"))
    if r.returncode != 0:
        raise LabError(f"level=fatal msg=\"etcd restore failed: {r.stderr.strip()}\"")
    # The snapshot's bootstrap data is encrypted with the server token: a wrong token cannot restore.
    check = subprocess.run(["etcdctl", "snapshot", "status", path, "-w", "json"], capture_output=True, text=True,
                           env=dict(os.environ, ETCDCTL_API="3"))
    del check
    if os.path.isdir(etcd_dir):
        os.rename(etcd_dir, f"{DB}/etcd-old-{int(time.time())}")
    os.rename(tmp, etcd_dir)
    with open(DB + "/reset-flag", "w") as f:
        f.write("")
    if token:
        with open(DATA + "/server/reset-token", "w") as f:
            f.write(token)
    print("level=info msg=\"Managed etcd cluster membership has been reset, restart without --cluster-reset flag now. Backup and delete ${datadir}/server/db on each peer etcd server and rejoin the nodes\"")
    return 0


def reset_membership(name, ip, etcd_dir, token):
    """`--cluster-reset` with no restore path: this member's own data, its membership reset to
    itself alone (k3s starts its etcd with ForceNewCluster) — how quorum comes back after losing
    it, or after VM rollbacks whose snapshots were not taken at one instant."""
    if not os.path.isdir(etcd_dir + "/member"):
        raise LabError("level=fatal msg=\"etcd: no existing etcd data to reset (nothing in db/etcd)\"")
    logf = open(NODE_STATE + "/etcd.log", "ab")
    p = subprocess.Popen(["etcd", "--name", name, "--data-dir", etcd_dir, "--force-new-cluster",
                          "--listen-client-urls", f"http://{ip}:2379", "--advertise-client-urls", f"http://{ip}:2379",
                          "--listen-peer-urls", f"http://{ip}:2380", "--initial-advertise-peer-urls", f"http://{ip}:2380",
                          "--listen-metrics-urls", f"http://{ip}:2381"],
                         stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
    try:
        end = time.time() + 60
        while True:
            if p.poll() is not None:
                raise LabError(f"level=fatal msg=\"etcd --force-new-cluster exited with {p.returncode}\"")
            r = subprocess.run(["etcdctl", "--endpoints", f"http://{ip}:2379", "--command-timeout=2s",
                                "get", "/lab/health"], capture_output=True, text=True,
                               env=dict(os.environ, ETCDCTL_API="3"))
            if r.returncode == 0:
                break
            if time.time() > end:
                raise LabError("level=fatal msg=\"etcd did not come up with its membership reset\"")
            time.sleep(0.3)
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(10)
    with open(DB + "/reset-flag", "w") as f:
        f.write("")
    if token:
        with open(DATA + "/server/reset-token", "w") as f:
            f.write(token)
    print("level=info msg=\"Managed etcd cluster membership has been reset, restart without --cluster-reset flag now. Backup and delete ${datadir}/server/db on each peer etcd server and rejoin the nodes\"")
    return 0


def rke2_certificate(args):
    """`rke2 certificate check [--output table]` and `rke2 certificate rotate` (the service
    stopped first, as the RKE2 docs require: the lab refuses otherwise)."""
    need_root()
    inst = load("installed.json", None)
    kind = inst["type"]
    sub = [a for a in args if not a.startswith("-")]
    verb = sub[0] if sub else "check"
    certs = node_certs(kind)
    if verb == "check":
        table = opt(args, "--output", opt(args, "-o", "text")) == "table"
        now = time.time()
        if table:
            print(f"{'FILENAME':<28} {'SUBJECT':<26} {'USAGES':<12} {'EXPIRES':<24} {'RESIDUAL TIME':<15} STATUS")
            print(f"{'--------':<28} {'-------':<26} {'------':<12} {'-------':<24} {'-------------':<15} ------")
        for rel, cn in sorted(certs.items()):
            path = f"{RKE2_DATA}/{rel}"
            if not os.path.exists(path):
                continue
            end = cert_not_after(path)
            days = int((end - now) // 86400)
            status = "EXPIRED" if end < now else ("WARNING" if days < RKE2_RENEW_DAYS else "OK")
            when = time.strftime("%b %d, %Y %H:%M UTC", time.gmtime(end))
            left = f"{days // 365} year" if days >= 365 else f"{days} days"
            usage = "ServerAuth" if os.path.basename(rel).startswith("serving") else "ClientAuth"
            if table:
                print(f"{os.path.basename(rel):<28} {cn:<26} {usage:<12} {when:<24} {left:<15} {status}")
            else:
                print(f"level=info msg=\"{os.path.basename(rel)}: certificate CN={cn} {status.lower()}, expires at {rfc3339(end)}\"")
        return 0
    if verb == "rotate":
        unit = f"rke2-{kind}"
        if daemon_pid(unit):
            raise LabError(f"level=fatal msg=\"{unit} is running: stop it before `rke2 certificate rotate` (lab: the RKE2 docs require the service stopped)\"")
        if kind == "server":
            backup = f"{DATA}/server/tls-{int(time.time())}"
            shutil.copytree(f"{DATA}/server/tls", backup)
            print(f"level=info msg=\"Server certificates backed up to {backup}\"")
        for rel in certs:
            for ext in (".crt", ".key"):
                try:
                    os.remove(f"{RKE2_DATA}/{rel[:-4]}{ext}")
                except OSError:
                    pass
        print("level=info msg=\"Certificates rotated: start rke2 to issue the new ones\"")
        return 0
    raise LabError(f"rke2 certificate: unknown command {verb}")


def killall(args):
    need_root()
    for u in DAEMONS:
        daemon_stop(u)
    return 0


# ------------------------------------------------------------------------------- dnf / rpm


def dnf(args):
    flags = [a for a in args if a.startswith("-")]
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return 0
    verb = words[0]
    if verb == "versionlock":
        locks = load("versionlock.json", [])
        sub = words[1] if len(words) > 1 else "list"
        if sub == "list":
            for lk in locks:
                print(lk)
            return 0
        need_root()
        for p in words[2:]:
            if sub == "add" and p not in locks:
                locks.append(p)
            if sub in ("delete", "del") and p in locks:
                locks.remove(p)
        if sub == "clear":
            locks = []
        save("versionlock.json", locks)
        print(f"Last metadata expiration check: 0:01:00 ago.\nVersionlock {sub}: {' '.join(words[2:])}")
        return 0
    if verb == "config-manager":
        need_root()
        repos = load("repos.json", {})
        en = "--set-enabled" in flags
        import fnmatch

        for pat in words[1:]:
            hit = [r for r in repos if fnmatch.fnmatch(r, pat)]
            if not hit and en:
                hit = [pat]
            for r in hit:
                repos.setdefault(r, {})["enabled"] = en
        save("repos.json", repos)
        return 0
    if verb == "repolist":
        for r, v in load("repos.json", {}).items():
            if v.get("enabled"):
                print(r)
        return 0
    if verb == "history":
        return dnf_history(words[1:])
    if verb in ("update", "upgrade") and len(words) == 1:
        need_root()
        return dnf_update_all(args)
    if verb in ("install", "update", "upgrade", "reinstall"):
        need_root()
        pk = load("packages.json", [])
        locks = load("versionlock.json", [])
        inst = load("installed.json", None)
        for p in words[1:]:
            if p.startswith("rke2-") and verb in ("update", "upgrade") and inst:
                if any(lk == "rke2-*" or p.startswith(lk.rstrip("*")) for lk in locks):
                    print(f"Package {p} is version-locked: not upgraded")
                    continue
            name = re.sub(r"-\d.*$", "", p)
            if name == "python3-dnf-plugin-versionlock":
                name = "dnf-plugin-versionlock"
            if name not in pk:
                pk.append(name)
            if name == "iscsi-initiator-utils":
                os.makedirs("/etc/iscsi", exist_ok=True)
                if not os.path.exists("/etc/iscsi/initiatorname.iscsi"):
                    with open("/etc/iscsi/initiatorname.iscsi", "w") as f:
                        f.write(f"InitiatorName=iqn.1994-05.com.redhat:{lab_info()['name']}\n")
        save("packages.json", pk)
        print("Complete!")
        return 0
    if verb in ("-y",):
        return 0
    if verb in ("makecache", "clean", "check-update"):
        return 0
    raise LabError(f"No such command: {verb}. (lab dnf)")


# The image's packages that the lab's repositories update (lab.py UPDATES); the installed time
# of 0 is the image build, before any boot.
BASE_PACKAGES = {"kernel-core": "5.14.0-570.17.1.el9_6", "openssl-libs": "3.2.2-6.el9_5.1",
                 "vim-minimal": "8.2.2637-21.el9", "tzdata": "2025a-1.el9"}
# dnf-utils' needs-restarting: an update of these asks for a reboot.
CORE_PACKAGES = ("kernel", "kernel-core", "kernel-rt", "glibc", "linux-firmware", "systemd", "openssl-libs",
                 "gnutls", "dbus", "dbus-broker", "dbus-daemon")


def os_packages():
    pk = load("os-packages.json", None)
    if pk is None:
        pk = {n: {"version": v, "installed": 0} for n, v in BASE_PACKAGES.items()}
    return pk


def dnf_update_all(args):
    """`dnf -y update`: every package the lab's repositories have newer, RKE2 only when not
    versionlocked (then to the newest patch release of its minor, as the RKE2 repo would)."""
    info = lab_info()
    try:
        with open(os.path.join(info["lab_dir"], "updates.json")) as f:
            updates = json.load(f)
    except (OSError, ValueError):
        updates = {}
    pk = os_packages()
    changes = []
    for name, new in sorted(updates.items()):
        cur = pk.get(name)
        if cur and cur["version"] != new:
            changes.append((name, cur["version"], new))
    inst = load("installed.json", None)
    locks = load("versionlock.json", [])
    rke2_new = None
    if inst and not any(lk.startswith("rke2") for lk in locks):
        have = parse_version(inst["version"])
        same = [v for v in info.get("available_versions", []) if parse_version(v)[:2] == have[:2]]
        best = max(same, key=parse_version) if same else inst["version"]
        if parse_version(best) > have:
            rke2_new = best
            changes.append((f"rke2-{inst['type']}", inst["version"].lstrip("v").replace("+", "~"),
                            best.lstrip("v").replace("+", "~")))
    print("Last metadata expiration check: 0:03:12 ago.")
    if not changes:
        print("Dependencies resolved.\nNothing to do.\nComplete!")
        return 0
    print("Dependencies resolved.\nUpgrading:")
    for name, old, new in changes:
        print(f" {name:<24} x86_64  {new:<28} baseos")
    now = time.time()
    for name, old, new in changes:
        if name in pk:
            pk[name] = {"version": new, "installed": now}
    save("os-packages.json", pk)
    if rke2_new:
        inst["version"] = rke2_new
        save("installed.json", inst)
    hist = load("dnf-history.json", [])
    hist.append({"id": len(hist) + 1, "cmdline": " ".join(args), "time": now,
                 "changes": [list(c) for c in changes]})
    save("dnf-history.json", hist)
    print("\nTransaction Summary\n" + "=" * 40 + f"\nUpgrade  {len(changes)} Packages\n\nComplete!")
    return 0


def dnf_history(words):
    hist = load("dnf-history.json", [])
    sub = words[0] if words else "list"
    if sub == "list":
        print("ID     | Command line             | Date and time    | Action(s)      | Altered")
        print("-" * 79)
        for h in reversed(hist):
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(h["time"]))
            print(f"{h['id']:>6} | {h['cmdline'][:24]:<24} | {when} | Upgrade        | {len(h['changes']):>4}")
        return 0
    if sub == "info":
        want = words[1] if len(words) > 1 else "last"
        pick = hist[-1:] if want == "last" else [h for h in hist if str(h["id"]) == want]
        if not pick:
            raise LabError(f"No transaction which manipulates package '{want}' was found.", 1)
        h = pick[0]
        when = time.strftime("%a %d %b %Y %I:%M:%S %p UTC", time.gmtime(h["time"]))
        print(f"Transaction ID : {h['id']}\nBegin time     : {when}\nEnd time       : {when}\n"
              f"User           : root <root>\nReturn-Code    : Success\nReleasever     : 9\n"
              f"Command Line   : {h['cmdline']}\nPackages Altered:")
        for name, old, new in h["changes"]:
            print(f"    Upgrade  {name}-{new}.x86_64 @baseos")
            print(f"    Upgraded {name}-{old}.x86_64 @@System")
        return 0
    raise LabError(f"lab dnf history: {sub} is not modelled")


def rpm(args):
    words = [a for a in args if not a.startswith("-")]
    pk = load("packages.json", [])
    inst = load("installed.json", None)
    rc = 0
    for p in words:
        if p in pk:
            v = inst["version"].lstrip("v").replace("+", "~") if p.startswith("rke2") and inst else "1.0"
            print(f"{p}-{v}-0.el9.x86_64")
        else:
            print(f"package {p} is not installed")
            rc = 1
    return rc


# ------------------------------------------------------------------------------- small tools


def firewall_cmd(args):
    fw = load("firewall.json", {"ports": [], "protocols": [], "sources": [], "services": ["ssh"]})
    if "--state" in args:
        running = units().get("firewalld", {}).get("active")
        print("running" if running else "not running")
        return 0 if running else 252
    if not units().get("firewalld", {}).get("active"):
        print("FirewallD is not running")
        return 252
    if "--list-all" in args or "--list-ports" in args:
        print(" ".join(fw["ports"]) if "--list-ports" in args else
              f"public\n  services: {' '.join(fw['services'])}\n  ports: {' '.join(fw['ports'])}\n"
              f"  protocols: {' '.join(fw['protocols'])}\n  sources: {' '.join(fw['sources'])}")
        return 0
    need_root()
    for a in args:
        for key, flag in (("ports", "--add-port="), ("protocols", "--add-protocol="), ("sources", "--add-source="),
                          ("services", "--add-service=")):
            if a.startswith(flag) and a[len(flag):] not in fw[key]:
                fw[key].append(a[len(flag):])
        if a.startswith("--remove-port=") and a[14:] in fw["ports"]:
            fw["ports"].remove(a[14:])
    save("firewall.json", fw)
    print("success")
    return 0


def hostnamectl(args):
    if args[:1] == ["set-hostname"] and len(args) > 1:
        need_root()
        subprocess.run(["hostname", args[1]], check=True)
        with open("/etc/hostname", "w") as f:
            f.write(args[1] + "\n")
        return 0
    print(f" Static hostname: {os.uname().nodename}\n  Virtualization: kvm\nOperating System: Rocky Linux 9.6 (Blue Onyx)")
    return 0


def ss(args):
    """The node's view: only sockets on its own address (the lab's nodes share the host's network)."""
    ip = lab_info()["ip"]
    r = subprocess.run(["/usr/bin/ss"] + args, capture_output=True, text=True)
    lines = r.stdout.splitlines()
    out = lines[:1]
    for line in lines[1:]:
        cols = line.split()
        if len(cols) >= 4 and (cols[3].startswith(ip + ":") or cols[3].startswith("[::ffff:" + ip + "]")):
            out.append(line)
    print("\n".join(out))
    return r.returncode


def lsblk(args):
    info = lab_info()
    size = int(info.get("disk_gb", 64)) * 1073741824
    short = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
    if "b" in short or "--bytes" in args:
        print(f"{size} disk")
    else:
        print(f"NAME SIZE TYPE\nvda {info.get('disk_gb', 64)}G disk")
    return 0


def etcdctl(args):
    """RKE2's etcd listens on https://127.0.0.1:2379 with client certificates; the lab's member
    listens on plain http on the node's address. Same command line, the real etcdctl underneath."""
    info = lab_info()
    out = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        name, eq, val = a.partition("=")
        if name in ("--cacert", "--cert", "--key", "--endpoints"):
            if not eq:
                val = args[i + 1] if i + 1 < len(args) else ""
                skip = True
            if name in ("--cert", "--key") and not os.path.exists(val):
                raise LabError(f"Error: open {val}: no such file or directory")
            if name == "--endpoints":
                eps = [re.sub(r"^https://(127\.0\.0\.1|localhost):2379$", f"http://{info['ip']}:2379", e)
                       for e in val.split(",")]
                out.append("--endpoints=" + ",".join(eps))
            continue
        out.append(a)
    real = shutil.which("etcdctl", path=os.pathsep.join(
        p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p not in ("/usr/local/bin", "")) or "/usr/bin")
    if not real:
        raise LabError("etcdctl: the lab needs the real etcdctl (etcd-client)")
    os.execv(real, ["etcdctl"] + out)


def main():
    tool = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    if tool == "node.py" and args:
        tool, args = args[0], args[1:]
    try:
        if tool == "systemctl":
            return systemctl(args)
        if tool == "etcdctl":
            return etcdctl(args)
        if tool == "rke2":
            return rke2(args)
        if tool == "rke2-install":
            return install(os.environ)
        if tool == "curl":
            return curl(args)
        if tool == "dnf" or tool == "yum":
            return dnf(args)
        if tool == "rpm":
            return rpm(args)
        if tool == "firewall-cmd":
            return firewall_cmd(args)
        if tool == "getenforce":
            print("Enforcing")
            return 0
        if tool == "systemd-detect-virt":
            print("kvm")
            return 0
        if tool == "timedatectl":
            print("yes" if "--value" in args else "System clock synchronized: yes\nNTP service: active")
            return 0
        if tool == "nmcli":
            print("running" if args[:2] == ["-t", "general"] or "general" in args else "")
            return 0
        if tool == "hostnamectl":
            return hostnamectl(args)
        if tool == "ss":
            return ss(args)
        if tool == "lsblk":
            return lsblk(args)
        if tool == "needs-restarting":
            return needs_restarting(args)
        if tool == "systemd-run":
            return systemd_run(args)
        if tool == "reboot" or (tool == "shutdown" and "-r" in args):
            need_root()
            return schedule_reboot(0.5)
        if tool == "iscsi-iname":
            print(f"iqn.1994-05.com.redhat:{os.urandom(6).hex()}")
            return 0
        if tool == "lab-certs" and args[:1] == ["expire-in"]:  # the lab's cert-expiry fault
            inst = load("installed.json", None)
            if not inst:
                raise LabError("lab-certs: rke2 is not installed on this node")
            age_certs(inst["type"], int(args[1]))
            return 0
        if tool in ("rke2-killall.sh", "rke2-uninstall.sh"):
            return killall(args)
        raise LabError(f"lab node: unknown tool {tool}", 127)
    except LabError as e:
        sys.stderr.write(str(e) + "\n")
        return e.code


if __name__ == "__main__":
    sys.exit(main())
